"""One reader for Detectron2's two kinds of config: YAML (``CfgNode``) and LazyConfig (``.py``).

train_net.py's start-up steps, the data check, the panoptic pictures and the command-line tools
ask :class:`ConfigAdapter` for what they need of a config (device, weights, data sets, class
counts, ...), whichever kind it is. Each setting keeps the key that sets it in either kind, so
that a message names the key the user wrote (``MODEL.WEIGHTS`` or ``train.init_checkpoint``) and
the override that fixes it (``KEY VALUE`` or ``key=value``).

A LazyConfig follows Detectron2's layout, as ``configs/common`` does: ``model``,
``dataloader.train``/``.test`` (built by ``instantiate``), ``train.*``.
"""

from detectron2.config import instantiate
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    detection_utils,
    get_detection_dataset_dicts,
)
from detectron2.modeling import build_model
from omegaconf import DictConfig, OmegaConf

from .checkpoint import GROUPING_KEYS, SHAPE_KEYS, EfficientPSCheckpointer
from .config import is_yaml_config, tta_config
from .data import EfficientPSDatasetMapper
from .data.dataset_mapper import check_augmentations
from .data.unreadable import SkipUnreadable
from .modeling.test_time_augmentation import EfficientPSWithTTA, check_tta_settings

__all__ = ["LAZY_LAYOUT", "ConfigAdapter", "lazy_keys_with_defaults"]

_REQUIRED = object()
# What a LazyConfig holds, as Detectron2's tools/lazyconfig_train_net.py reads it.
LAZY_LAYOUT = (
    "Detectron2's layout: model, dataloader (.train, .test, optionally .evaluator), optimizer, "
    "lr_multiplier and train (see configs/common/train.py)"
)

# setting: (YAML key, LazyConfig key, LazyConfig default when the key is absent). Every YAML key
# has a default (efficientps_d2.config, Detectron2's defaults).
_KEYS = {
    "output_dir": ("OUTPUT_DIR", "train.output_dir", _REQUIRED),
    "device": ("MODEL.DEVICE", "train.device", "cuda"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint", _REQUIRED),
    "allow_partial_weights": ("MODEL.ALLOW_PARTIAL_WEIGHTS", "train.allow_partial_weights", False),
    "amp_enabled": ("SOLVER.AMP.ENABLED", "train.amp.enabled", _REQUIRED),
    "amp_precision": ("SOLVER.AMP.PRECISION", "train.amp.precision", "float16"),
    "input_format": ("INPUT.FORMAT", "model.input_format", _REQUIRED),
    "train_dataset_names": ("DATASETS.TRAIN", "dataloader.train.dataset.names", None),
    "test_dataset_names": ("DATASETS.TEST", "dataloader.test.dataset.names", None),
    "num_classes": ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "model.sem_seg_head.num_classes", None),
    "num_things": ("MODEL.ROI_HEADS.NUM_CLASSES", "model.roi_heads.num_classes", None),
    "thing_semantic_ids": (
        "MODEL.EFFICIENTPS.THING_SEMANTIC_IDS",
        "model.thing_semantic_ids",
        None,
    ),
    "check_pngs": ("DATASETS.CHECK_PNGS", "train.check_pngs", True),
    "vis_period": ("VIS_PERIOD", "train.vis_period", 0),
    "expected_results": ("TEST.EXPECTED_RESULTS", "train.expected_results", None),
    "score_thresh_test": (
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "model.roi_heads.box_predictor.test_score_thresh",
        _REQUIRED,
    ),
    "fusion_confidence_thresh": (
        "MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH",
        "model.confidence_thresh",
        _REQUIRED,
    ),
}


# A LazyConfig's settings that fix the model's tensor shapes and that group the optimizer's
# parameters, in the checkpointer's words (a YAML config's are its defaults).
_LAZY_SHAPE_KEYS = (
    "the backbone (model.backbone.bottom_up), model.backbone.out_channels and the class counts "
    "(model.sem_seg_head.num_classes, model.roi_heads.num_classes)"
)
_LAZY_GROUPING_KEYS = "optimizer.params.bias_lr_factor, optimizer.params.weight_decay_norm, ..."


def lazy_keys_with_defaults():
    """The LazyConfig keys read with a default where a config leaves them out (``train.device``,
    ``train.check_pngs``, ...): an override may set them though the config has none."""
    return {lazy for _, lazy, default in _KEYS.values() if default is not _REQUIRED}


def _names(value):
    """A list of data set names from a name, a list of names or None."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class ConfigAdapter:
    """The settings, model and loaders of a YAML or LazyConfig config, asked for the same way.

    Settings are read from the config when asked (a change to the config shows). ``keys`` maps
    each setting to the key that sets it in this config's kind, e.g. ``keys["weights"]`` is
    "MODEL.WEIGHTS" or "train.init_checkpoint"; :meth:`override` writes the command-line override
    that sets a key.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.is_yaml = is_yaml_config(cfg)
        column = 0 if self.is_yaml else 1
        self.keys = {name: keys[column] for name, keys in _KEYS.items()}

    def override(self, name, value):
        """The override that sets setting ``name`` to ``value``: "KEY VALUE" (YAML) or
        "key=value" (LazyConfig), as train_net.py takes them."""
        return f"{self.keys[name]} {value}" if self.is_yaml else f"{self.keys[name]}={value}"

    def set(self, name, value):
        """Sets setting ``name`` (a key of either kind, see :attr:`keys`) to ``value``."""
        if self.is_yaml:
            self.cfg.merge_from_list([self.keys[name], value])
        else:
            OmegaConf.update(self.cfg, self.keys[name], value, merge=False)

    def _get(self, name):
        key = self.keys[name]
        if self.is_yaml:
            node = self.cfg
            for part in key.split("."):
                node = node[part]
            return node
        default = _KEYS[name][2]
        value = OmegaConf.select(self.cfg, key, default=default)
        if value is _REQUIRED:
            raise ValueError(f"The LazyConfig has no {key}: EfficientPS reads {LAZY_LAYOUT}.")
        return value

    @property
    def output_dir(self):
        """OUTPUT_DIR / ``train.output_dir``."""
        return self._get("output_dir")

    @property
    def device(self):
        """MODEL.DEVICE / ``train.device`` (default "cuda")."""
        return self._get("device")

    @property
    def weights(self):
        """MODEL.WEIGHTS / ``train.init_checkpoint``: the weights to start from or evaluate."""
        return self._get("weights")

    @property
    def allow_partial_weights(self):
        """MODEL.ALLOW_PARTIAL_WEIGHTS / ``train.allow_partial_weights`` (default False)."""
        return bool(self._get("allow_partial_weights"))

    @property
    def amp_enabled(self):
        """SOLVER.AMP.ENABLED / ``train.amp.enabled``."""
        return bool(self._get("amp_enabled"))

    @property
    def amp_precision(self):
        """SOLVER.AMP.PRECISION / ``train.amp.precision`` (default "float16")."""
        return self._get("amp_precision")

    @property
    def input_format(self):
        """INPUT.FORMAT / ``model.input_format``: the format of the model's images ("BGR",
        "RGB", ... as Detectron2's read_image reads them)."""
        return self._get("input_format")

    @property
    def train_dataset_names(self):
        """DATASETS.TRAIN / ``dataloader.train.dataset.names``, as a list."""
        return _names(self._get("train_dataset_names"))

    @property
    def test_dataset_names(self):
        """DATASETS.TEST / ``dataloader.test.dataset.names``, as a list."""
        return _names(self._get("test_dataset_names"))

    @property
    def num_classes(self):
        """The semantic head's classes (stuff and things): MODEL.SEM_SEG_HEAD.NUM_CLASSES /
        ``model.sem_seg_head.num_classes``."""
        return self._get("num_classes")

    @property
    def num_things(self):
        """Mask R-CNN's thing classes: MODEL.ROI_HEADS.NUM_CLASSES /
        ``model.roi_heads.num_classes``."""
        return self._get("num_things")

    @property
    def thing_semantic_ids(self):
        """The all-class semantic id of each thing class as the config lists them:
        MODEL.EFFICIENTPS.THING_SEMANTIC_IDS / ``model.thing_semantic_ids``; [] where they come
        from the data set's metadata (an empty YAML list, a LazyCall of
        ``thing_semantic_ids_of``)."""
        ids = self._get("thing_semantic_ids")
        if ids is None or isinstance(ids, (dict, DictConfig)):
            return []
        return list(ids)

    @property
    def check_pngs(self):
        """DATASETS.CHECK_PNGS / ``train.check_pngs`` (default True): whether the data check
        opens every panoptic PNG."""
        return bool(self._get("check_pngs"))

    @property
    def vis_period(self):
        """VIS_PERIOD / ``train.vis_period`` (default 0): iterations between panoptic pictures."""
        return self._get("vis_period")

    @property
    def expected_results(self):
        """TEST.EXPECTED_RESULTS / ``train.expected_results`` (default []): ``[task, metric,
        expected value, tolerance]`` rows that Detectron2's ``verify_results`` checks, as
        lists. A row of another form raises ValueError naming the key (Detectron2 would fail to
        unpack it after training)."""
        rows = [list(row) for row in self._get("expected_results") or []]

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for row in rows:
            if not (
                len(row) == 4
                and all(isinstance(v, str) for v in row[:2])
                and all(number(v) for v in row[2:])
            ):
                raise ValueError(
                    f"{self.keys['expected_results']} has the row {row}; each row is [task, "
                    "metric, expected value, tolerance], e.g. ['panoptic_seg', 'PQ', 60.3, 0.5]."
                )
        return rows

    def checkpointer(self, model, save_dir="", **kwargs):
        """An :class:`EfficientPSCheckpointer` for ``model`` (``kwargs`` as it takes them) whose
        messages name this config's keys (MODEL.WEIGHTS or ``train.init_checkpoint``, ...)."""
        return EfficientPSCheckpointer(
            model,
            save_dir,
            weights_key=self.keys["weights"],
            partial_key=self.keys["allow_partial_weights"],
            shape_keys=SHAPE_KEYS if self.is_yaml else _LAZY_SHAPE_KEYS,
            grouping_keys=GROUPING_KEYS if self.is_yaml else _LAZY_GROUPING_KEYS,
            **kwargs,
        )

    def build_model(self):
        """The model, on :attr:`device`."""
        if self.is_yaml:
            return build_model(self.cfg)
        if "model" not in self.cfg:
            raise ValueError(f"The LazyConfig has no model: EfficientPS reads {LAZY_LAYOUT}.")
        return instantiate(self.cfg.model).to(self.device)

    def build_test_augmentations(self):
        """What resizes an input for inference: Detectron2's test-time resize of
        INPUT.MIN/MAX_SIZE_TEST, or ``dataloader.test.mapper.augmentations``."""
        if self.is_yaml:
            return detection_utils.build_augmentation(self.cfg, False)
        augmentations = instantiate(self.cfg.dataloader.test.mapper.augmentations)
        return check_augmentations(augmentations, "dataloader.test.mapper.augmentations")

    @property
    def tta_enabled(self):
        """TEST.AUG.ENABLED / ``train.tta.enabled`` (off where the LazyConfig has no
        ``train.tta``)."""
        if self.is_yaml:
            return bool(tta_config(self.cfg).ENABLED)
        tta = self.cfg.train.get("tta", None)
        return bool(tta is not None and tta.enabled)

    def tta_settings(self):
        """(min_sizes, max_size, flip) of TEST.AUG / ``train.tta``, checked and normalised by
        :func:`~efficientps_d2.modeling.test_time_augmentation.check_tta_settings` (ValueError
        naming the key). train_net.py checks them at start-up: test-time augmentation runs after
        training."""
        names = ("min_sizes", "max_size", "flip")
        if self.is_yaml:
            aug = tta_config(self.cfg)
            values = [aug[name.upper()] for name in names]
            keys = [f"TEST.AUG.{name.upper()}" for name in names]
        else:
            values = [self.cfg.train.tta.get(name) for name in names]
            keys = [f"train.tta.{name}" for name in names]
        return check_tta_settings(*values, keys=keys)

    def build_tta_model(self, model):
        """``model`` wrapped in :class:`EfficientPSWithTTA` as TEST.AUG / ``train.tta`` set it,
        or None where test-time augmentation is off."""
        if not self.tta_enabled:
            return None
        if self.is_yaml:
            return EfficientPSWithTTA(self.cfg, model)
        min_sizes, max_size, flip = self.tta_settings()
        predictor = self.cfg.model.roi_heads.box_predictor
        return EfficientPSWithTTA(
            None,
            model,
            min_sizes=min_sizes,
            max_size=max_size,
            flip=flip,
            nms_thresh=predictor.test_nms_thresh,
            detections_per_image=predictor.test_topk_per_image,
        )

    def build_train_loader(self):
        """The training loader: ``dataloader.train``, or Detectron2's with EfficientPS's mapper
        wrapped in :class:`SkipUnreadable` (DATALOADER.MAX_UNREADABLE_FRACTION), as
        train_net.py trains with."""
        if not self.is_yaml:
            return instantiate(self.cfg.dataloader.train)
        cfg = self.cfg
        # The data set dicts as Detectron2 would load them, loaded here to size the skip limit.
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        mapper = SkipUnreadable(
            EfficientPSDatasetMapper(cfg, True),
            num_samples=len(dataset),
            max_fraction=cfg.DATALOADER.MAX_UNREADABLE_FRACTION,
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    def build_test_loader(self):
        """The loader of the first test data set: ``dataloader.test``, or Detectron2's with
        EfficientPS's mapper."""
        if not self.is_yaml:
            return instantiate(self.cfg.dataloader.test)
        names = self.test_dataset_names
        if not names:
            raise ValueError("DATASETS.TEST is empty: name a data set to read inputs from.")
        return build_detection_test_loader(
            self.cfg, names[0], mapper=EfficientPSDatasetMapper(self.cfg, False)
        )
