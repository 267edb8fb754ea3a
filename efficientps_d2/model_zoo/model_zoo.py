"""Configs by name, and models built from them.

Names are the configs' paths relative to the source tree's ``configs/`` folder, e.g.
"Cityscapes-PanopticSegmentation/efficientps_b5.yaml", or its LazyConfig twin "...b5.py" (as in
Detectron2's model zoo, a ``.py`` name gives a LazyConfig and a model instantiated from it). That
folder is the single source of truth:
``setup.py`` ships it inside the package as ``efficientps_d2/model_zoo/configs`` (a symlink in the
source tree, copied files in a wheel), and an editable install without it falls back to the source
tree's ``configs/``.

There are no released EfficientPS weights for this implementation yet, so ``trained=True`` (kept
for the signature of Detectron2's ``model_zoo``) is an error that says so; a checkpoint of your own
goes in MODEL.WEIGHTS (train.init_checkpoint).
"""

import os

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "list_configs"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# Packaged copy (wheel) or build-time symlink (source tree), then the source tree itself.
_CONFIG_ROOTS = (
    os.path.join(_HERE, "configs"),
    os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs"),
)
_MARKER = "Base-EfficientPS.yaml"


def _configs_root():
    for root in _CONFIG_ROOTS:
        if os.path.isfile(os.path.join(root, _MARKER)):
            return root
    raise RuntimeError(
        "efficientps_d2's configs are not installed: none of "
        f"{[os.path.normpath(r) for r in _CONFIG_ROOTS]} holds '{_MARKER}'. Reinstall the package "
        "(`pip install .` from the source tree ships them)."
    )


def _is_config(relative):
    """Whether a file (its path relative to ``configs/``, with "/") is a config: a YAML file, or a
    ``.py`` one that is not among the LazyConfig parts in ``common/``."""
    return relative.endswith(".yaml") or (
        relative.endswith(".py") and not relative.startswith("common/")
    )


def list_configs():
    """Names of the shipped model configs: the YAML ones and their LazyConfig twins (``.py``).
    What they build on is left out (``Base-*.yaml``, the LazyConfig parts in ``common/``)."""
    root = _configs_root()
    names = []
    for folder, _, files in os.walk(root, followlinks=True):
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
            if _is_config(rel) and not f.startswith("Base-"):
                names.append(rel)
    return sorted(names)


def _normalise(name):
    name = name.replace("\\", "/")
    return name[len("configs/") :] if name.startswith("configs/") else name


def get_config_file(name):
    """Path of a shipped config file.

    Args:
        name: path relative to ``configs/``, e.g.
            "Cityscapes-PanopticSegmentation/efficientps_b5.yaml" (or ``.py``, its LazyConfig
            twin).
    Raises:
        RuntimeError: unknown name (the known ones are listed).
    """
    name = _normalise(name)
    root = _configs_root()
    path = os.path.normpath(os.path.join(root, name))
    inside = path.startswith(os.path.normpath(root) + os.sep)
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    if not inside or not _is_config(relative) or not os.path.isfile(path):
        raise RuntimeError(
            f"'{name}' is not in efficientps_d2's model zoo; the configs are: {list_configs()}."
        )
    return path


def get_config(name, trained=False):
    """The Detectron2 config of a shipped config name, as Detectron2's ``model_zoo.get_config``:
    a ``CfgNode`` with EfficientPS's keys for a ``.yaml`` name, an omegaconf ``DictConfig``
    (``LazyConfig.load``) for a ``.py`` one. Either falls back to the CPU without CUDA.

    Args:
        name: see :func:`get_config_file`.
        trained: the released trained weights; none are released yet, so True raises
            RuntimeError (the config's own MODEL.WEIGHTS / train.init_checkpoint is kept
            otherwise).
    """
    from ..engine.lazy_config import load_config

    if trained:  # before loading: the answer does not depend on the config's contents
        _no_trained_checkpoint(name)
    return load_config(get_config_file(name))


def get_checkpoint_url(name):
    """Detectron2's ``model_zoo.get_checkpoint_url``: the released trained checkpoint of a config
    name. None is released yet, so this raises RuntimeError (after checking the name), as
    ``trained=True`` does."""
    _no_trained_checkpoint(name)


def _no_trained_checkpoint(name):
    """Raises RuntimeError naming the key that takes a checkpoint in the config's kind (after
    checking the name)."""
    from ..engine.lazy_config import is_lazy_config

    key = "train.init_checkpoint" if is_lazy_config(get_config_file(name)) else "MODEL.WEIGHTS"
    raise RuntimeError(
        f"No trained checkpoint is released for '{_normalise(name)}': none of the configs has "
        f"one yet. Set {key} to a checkpoint of your own (a local file or a URL)."
    )


def get(name, trained=False, device=None):
    """Builds the model of a shipped config and loads its weights (if any).

    Args:
        name: see :func:`get_config_file`.
        trained: load the released trained weights (see :func:`get_config`); else the config's
            own MODEL.WEIGHTS / train.init_checkpoint, as Detectron2 does: torchvision's ImageNet
            backbone for the Cityscapes and COCO configs (``torchvision://``, downloaded once),
            none for the synthetic one.
        device: e.g. "cpu" or "cuda"; default: the config's MODEL.DEVICE / train.device when
            CUDA is available, else "cpu".
    Returns:
        the EfficientPS model, in training mode like Detectron2's ``model_zoo.get``; call
        ``.eval()`` before inference.
    """
    from ..config_adapter import ConfigAdapter

    config = ConfigAdapter(get_config(name, trained))
    if device is not None:
        config.set("device", device)
    model = config.build_model()
    config.checkpointer(model).load(config.weights)
    return model
