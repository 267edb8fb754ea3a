"""Loading Detectron2's two kinds of config file, YAML (``CfgNode``) and LazyConfig (``.py``),
plus the helpers EfficientPS's LazyConfig files call.

The kind is told by the file's extension, as Detectron2's own tools do: ``.py`` is loaded with
``LazyConfig.load`` and ``KEY=VALUE`` overrides; anything else is a YAML config with EfficientPS's
keys added and ``KEY VALUE`` overrides, except the YAML file that ``LazyConfig.save`` writes of
a LazyConfig (``config.yaml`` in a LazyConfig run's output folder), which is read as
Detectron2's ``lazyconfig_train_net.py`` reads it: a LazyConfig.
:class:`efficientps_d2.config_adapter.ConfigAdapter` reads either kind's settings and builds its
model and data loaders.

A ``key=value`` override is checked as yacs checks a YAML one, where Detectron2 would create a
misspelled key silently: the key must exist in the config, or be an argument that its
``LazyCall``'s target names (or a setting train_net.py reads with a default), and a number, a
yes/no or a group of settings keeps its kind (an integer stays whole: ``train.max_iter=1e4`` is
10000, ``train.max_iter=2.5`` is refused). Hydra's ``+key=value`` adds a key unchecked.
"""

import difflib
import inspect
import os

import torch
import yaml
from detectron2.config import LazyConfig
from detectron2.data import MetadataCatalog
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import check_no_options, find_config_file, setup_cfg
from ..config_adapter import LAZY_LAYOUT, lazy_keys_with_defaults
from ..data.metadata import thing_semantic_ids

__all__ = [
    "INFERENCE_PARTS",
    "TRAINING_PARTS",
    "apply_overrides",
    "is_lazy_config",
    "load_config",
    "thing_semantic_ids_of",
]


# The parts of a LazyConfig; a YAML config's keys are upper-case (MODEL, SOLVER, ...).
_LAZY_PARTS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def is_lazy_config(path):
    """True for a Detectron2 LazyConfig: a python file, or a YAML file that ``LazyConfig.save``
    wrote of one (its top level holds the lower-case parts ``model``, ``dataloader``, ...)."""
    path = str(path)
    if path.endswith(".py"):
        return True
    if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            # Its nodes, not objects: a saved LazyConfig may hold python tags (a ShapeSpec).
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the YAML config loader names what is wrong with it
    if not isinstance(root, yaml.MappingNode):
        return False
    return any(key.value in _LAZY_PARTS for key, _ in root.value)


def thing_semantic_ids_of(dataset_name):
    """All-class semantic id of each Mask R-CNN class, from a registered data set's metadata.

    What MODEL.EFFICIENTPS.THING_SEMANTIC_IDS: [] does in a YAML config, for LazyConfig files:
    ``thing_semantic_ids=L(thing_semantic_ids_of)(dataset_name="cityscapes_fine_panoptic_train")``.
    """
    return thing_semantic_ids(MetadataCatalog.get(_single_name(dataset_name)))


def _single_name(names):
    if isinstance(names, str):
        return names
    names = list(names)
    if not names:
        raise ValueError("No data set is named.")
    return names[0]


# The parts of a LazyConfig that inference reads (demo, export, --eval-only), and training.
INFERENCE_PARTS = ("model", "dataloader.test", "train")
TRAINING_PARTS = ("model", "dataloader.train", "optimizer", "lr_multiplier", "train")


def load_config(config_file, opts=(), needs=()):
    """Loads a YAML (:func:`~efficientps_d2.config.setup_cfg`) or LazyConfig file, or a model zoo
    name of either kind, and applies the command-line overrides.

    Configs default to CUDA; where it is not available the device becomes "cpu" (MODEL.DEVICE or
    train.device), as train_net.py does. A LazyConfig that lacks one of the parts ``needs`` names
    (e.g. :data:`INFERENCE_PARTS`) is refused, naming the file, before anything reads it.

    Returns:
        a ``CfgNode`` (YAML; not frozen) or an omegaconf ``DictConfig`` (LazyConfig).
    """
    if is_lazy_config(config_file):
        config_file = find_config_file(config_file)  # or a model zoo name
        cfg = LazyConfig.load(config_file)
        cfg = apply_overrides(cfg, opts, config_file)
        _check_layout(cfg, config_file, needs)
        train = cfg.get("train")  # absent where not needed
        if (
            isinstance(train, DictConfig)
            and str(train.get("device", "cuda")).startswith("cuda")
            and not torch.cuda.is_available()
        ):
            train.device = "cpu"
        return cfg
    return setup_cfg(config_file, opts, freeze=False)


def _check_layout(cfg, config_file, keys):
    """Refuses a LazyConfig that lacks any of ``keys`` ("model", "dataloader.train", ...), or
    where an override (``~model``, ``model=null``) left one None, naming the file and the layout,
    before anything reads it."""
    missing = [key for key in keys if _node(cfg, key) is None or _node(cfg, key)._is_none()]
    if missing:
        raise ValueError(
            f"{config_file} defines no {' and no '.join(missing)}: EfficientPS reads a LazyConfig "
            f"of {LAZY_LAYOUT}."
        )


def _walk(cfg, parts):
    """(the deepest node on the path ``parts`` of a config, how many of the parts lead to it)."""
    node = cfg
    for depth, name in enumerate(parts):
        child = _child(node, name)
        if child is None:
            return node, depth
        node = child
    return node, len(parts)


def _node(cfg, key):
    """The node at ``key`` ("a.b.c"), or None where the config has none."""
    parts = key.split(".")
    node, depth = _walk(cfg, parts)
    return node if depth == len(parts) else None


def apply_overrides(cfg, opts, config_file):
    """Detectron2's ``LazyConfig.apply_overrides``, one ``key=value`` at a time, each checked first
    (see the module docstring); a refused one raises ValueError naming the override, the key and
    ``config_file``, with the closest keys. Returns ``cfg``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_no_options(opts, config_file)
    for opt in opts:
        if "=" not in opt and not opt.startswith("~"):  # "~key" (a deletion): Detectron2 says
            raise ValueError(
                f"Override '{opt}' of {config_file} has no '=': a LazyConfig takes key=value "
                "overrides (a YAML config takes KEY VALUE pairs)."
            )
    for override in OverridesParser.create().parse_overrides(list(opts)):
        key, value = override.key_or_group, override.value()
        line, node = override.input_line, _node(cfg, key)
        if not (override.is_add() or override.is_force_add()):
            if _holds_int(node) and isinstance(value, float) and value.is_integer():
                # A whole float where the config holds an integer (train.max_iter=1e4, as one
                # writes big counts) is that integer; a fraction is refused below.
                value = int(value)
                line = f"{key}={value}"
            _check_override(cfg, key, value, override, config_file)
        if isinstance(node, DictConfig) and "_target_" in node and not isinstance(value, dict):
            # A LazyCall replaced by a value (model.thing_semantic_ids=[0,1,2]), which
            # Detectron2's merging update refuses ("Cannot merge DictConfig with ListConfig").
            OmegaConf.update(cfg, key, value, merge=False)
        else:
            LazyConfig.apply_overrides(cfg, [line])
    return cfg


def _child(node, name):
    """The child node ``name`` of a config node, or None where it has none."""
    if isinstance(node, DictConfig):
        return node._get_node(name, throw_on_missing_key=False)
    if isinstance(node, ListConfig) and name.isdigit() and int(name) < len(node):
        return node._get_node(int(name))
    return None


def _target_parameters(node):
    """The keyword arguments a ``LazyCall`` node's target takes, or None where any name may be
    one: its signature cannot be read, or its ``**kwargs`` reach past its own classes' arguments
    (a class's ``**kwargs`` are followed up its bases: StandardROIHeads passes
    ``proposal_append_gt`` on to ROIHeads)."""
    target = node._get_node("_target_")._value()
    try:
        target = locate(target) if isinstance(target, str) else target
    except ImportError:
        return None
    if inspect.isclass(target):
        functions = [vars(c)["__init__"] for c in target.__mro__ if "__init__" in vars(c)]
    else:
        functions = [target]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = []
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names += [p.name for p in parameters if p.kind in kinds]
        if all(p.kind != inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None


def _holds_int(node):
    """Whether a config node (or None) holds an integer value (not a yes/no)."""
    if node is None or isinstance(node, (DictConfig, ListConfig)) or node._is_interpolation():
        return False
    return isinstance(node._value(), int) and not isinstance(node._value(), bool)


def _check_override(cfg, key, value, override, config_file):
    """Refuses the override (see :func:`apply_overrides`)."""
    where = f"override '{override.input_line}' of {config_file}"
    parts = key.split(".")
    node, depth = _walk(cfg, parts)
    if depth == len(parts):
        _check_kind(node, key, value, where)
        return
    name, parent = parts[depth], ".".join(parts[:depth]) or "the config"
    if not isinstance(node, DictConfig):  # a value, or a list without that index
        what = "a list" if isinstance(node, ListConfig) else f"the value {node._value()!r}"
        raise ValueError(f"Refused {where}: {parent} is {what}, which has no '{name}'.")
    is_call = depth == len(parts) - 1 and "_target_" in node
    parameters = _target_parameters(node) if is_call else []
    if depth == len(parts) - 1 and (
        key in lazy_keys_with_defaults()  # read with a default where the config has none
        or parameters is None  # a LazyCall whose arguments cannot be told
        or name in parameters  # an argument the LazyCall leaves at its default
    ):
        return
    candidates = [str(k) for k in node.keys() if k != "_target_"]
    candidates += [p for p in parameters if p not in candidates]
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    takes = " and its LazyCall's target takes no such argument" if is_call else ""
    raise ValueError(
        f"Refused {where}: {parent} has no key '{name}'{takes}.{hint} To add a new key, write "
        f"'+{override.input_line}'."
    )


def _check_kind(node, key, value, where):
    """Refuses a value of another kind than the config's: a number, a yes/no (bool) or a group of
    settings replaced by something else, or a fraction where the config holds an integer (an
    iteration count: ``range`` refused it after the model was built). Strings and lists are left
    free (data set names are either; ``short_edge_length`` takes a number or a list)."""
    if value is None or isinstance(node, ListConfig):
        return
    if isinstance(node, DictConfig):
        if isinstance(value, dict) or "_target_" in node:
            return  # merged into the group; a LazyCall may be replaced
        raise ValueError(
            f"Refused {where}: {key} is a group of settings ({', '.join(map(str, node.keys()))}); "
            f"set one of them, e.g. {key}.{next(iter(node.keys()), 'name')}=..."
        )
    if node._is_interpolation():
        return
    old = node._value()
    if isinstance(old, bool):
        ok = isinstance(value, bool)
    elif isinstance(old, (int, float)):
        kinds = int if isinstance(old, int) else (int, float)  # an int takes no float
        ok = isinstance(value, kinds) and not isinstance(value, bool)
    else:
        return
    if not ok:
        raise ValueError(
            f"Refused {where}: {key} is {old!r} ({type(old).__name__}) in the config; the "
            f"override gives {value!r} ({type(value).__name__})."
        )
