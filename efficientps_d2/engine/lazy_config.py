"""Loading Detectron2's two kinds of config file, YAML (``CfgNode``) and LazyConfig (``.py``),
plus the helpers EfficientPS's LazyConfig files call.

The kind is told by the file's extension, as Detectron2's own tools do: ``.py`` is loaded with
``LazyConfig.load`` and ``KEY=VALUE`` overrides; anything else is a YAML config with EfficientPS's
keys added and ``KEY VALUE`` overrides. :class:`efficientps_d2.config_adapter.ConfigAdapter`
reads either kind's settings and builds its model and data loaders.
"""

import os

import torch
from detectron2.config import LazyConfig
from detectron2.data import MetadataCatalog

from ..config import setup_cfg
from ..data.metadata import thing_semantic_ids

__all__ = ["is_lazy_config", "load_config", "thing_semantic_ids_of"]


def is_lazy_config(path):
    """True for a Detectron2 LazyConfig (python) file."""
    return str(path).endswith(".py")


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


def load_config(config_file, opts=()):
    """Loads a YAML (:func:`~efficientps_d2.config.setup_cfg`) or LazyConfig file, or a model zoo
    name of either kind, and applies the command-line overrides.

    Configs default to CUDA; where it is not available the device becomes "cpu" (MODEL.DEVICE or
    train.device), as train_net.py does.

    Returns:
        a ``CfgNode`` (YAML; not frozen) or an omegaconf ``DictConfig`` (LazyConfig).
    """
    if is_lazy_config(config_file):
        if not os.path.isfile(config_file):  # a model zoo name; its error lists the names
            from ..model_zoo import get_config_file

            config_file = get_config_file(config_file)
        cfg = LazyConfig.load(config_file)
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
        if (
            str(cfg.train.get("device", "cuda")).startswith("cuda")
            and not torch.cuda.is_available()
        ):
            cfg.train.device = "cpu"
        return cfg
    return setup_cfg(config_file, opts, freeze=False)
