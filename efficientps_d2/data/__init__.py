"""Data: the panoptic dataset mapper, COCO-panoptic-format registration, built-in synthetic data."""

from . import synthetic  # noqa: F401  (registers synthetic_panoptic_{train,val})
from .coco_panoptic import register_panoptic_dataset
from .dataset_mapper import EfficientPSDatasetMapper

__all__ = ["EfficientPSDatasetMapper", "register_panoptic_dataset"]
