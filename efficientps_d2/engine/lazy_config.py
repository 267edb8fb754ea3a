"""Detectron2's two kinds of config file, YAML (``CfgNode``) and LazyConfig (``.py``), behind one
small interface, plus the helpers EfficientPS's LazyConfig files call.

The kind is told by the file's extension, as Detectron2's own tools do: ``.py`` is loaded with
``LazyConfig.load`` and ``KEY=VALUE`` overrides; anything else is a YAML config with EfficientPS's
keys added and ``KEY VALUE`` overrides. :class:`ConfigAdapter` builds the model and data loaders of
either kind, for the command-line tools that accept both.
"""

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.modeling import build_model

from ..config import is_yaml_config, setup_cfg
from ..data.metadata import thing_semantic_ids

__all__ = ["ConfigAdapter", "is_lazy_config", "load_config", "thing_semantic_ids_of"]


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
    """Loads a YAML (:func:`~efficientps_d2.config.setup_cfg`) or LazyConfig file and applies the
    command-line overrides.

    Configs default to CUDA; where it is not available the device becomes "cpu" (MODEL.DEVICE or
    train.device), as train_net.py does.

    Returns:
        a ``CfgNode`` (YAML; not frozen) or an omegaconf ``DictConfig`` (LazyConfig).
    """
    if is_lazy_config(config_file):
        cfg = LazyConfig.load(config_file)
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
        if (
            str(cfg.train.get("device", "cuda")).startswith("cuda")
            and not torch.cuda.is_available()
        ):
            cfg.train.device = "cpu"
        return cfg
    return setup_cfg(config_file, opts, freeze=False)


class ConfigAdapter:
    """The model, loaders and settings of a YAML or LazyConfig config, asked for the same way.

    LazyConfig files follow Detectron2's layout: ``model``, ``dataloader.train``/``.test``,
    ``train.device``, ``train.init_checkpoint``, ``train.output_dir``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.lazy = not is_yaml_config(cfg)

    @property
    def device(self):
        return self.cfg.train.device if self.lazy else self.cfg.MODEL.DEVICE

    @property
    def weights(self):
        """MODEL.WEIGHTS or train.init_checkpoint."""
        return self.cfg.train.init_checkpoint if self.lazy else self.cfg.MODEL.WEIGHTS

    @property
    def input_format(self):
        return self.cfg.model.input_format if self.lazy else self.cfg.INPUT.FORMAT

    def train_dataset_names(self):
        if self.lazy:
            names = self.cfg.dataloader.train.dataset.names
            return [names] if isinstance(names, str) else list(names)
        return list(self.cfg.DATASETS.TRAIN)

    def test_dataset_names(self):
        if self.lazy:
            names = self.cfg.dataloader.test.dataset.names
            return [names] if isinstance(names, str) else list(names)
        return list(self.cfg.DATASETS.TEST)

    def build_model(self):
        if self.lazy:
            model = instantiate(self.cfg.model)
            return model.to(self.device)
        return build_model(self.cfg)

    def build_train_loader(self):
        from ..data import EfficientPSDatasetMapper

        if self.lazy:
            return instantiate(self.cfg.dataloader.train)
        return build_detection_train_loader(
            self.cfg, mapper=EfficientPSDatasetMapper(self.cfg, True)
        )

    def build_test_loader(self):
        """The loader of the first test data set."""
        from ..data import EfficientPSDatasetMapper

        if self.lazy:
            return instantiate(self.cfg.dataloader.test)
        names = self.test_dataset_names()
        if not names:
            raise ValueError("DATASETS.TEST is empty: name a data set to read inputs from.")
        return build_detection_test_loader(
            self.cfg, names[0], mapper=EfficientPSDatasetMapper(self.cfg, False)
        )
