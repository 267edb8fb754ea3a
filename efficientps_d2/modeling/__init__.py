"""EfficientPS's Detectron2 components; importing this module registers them."""

from .backbone import (
    build_efficientnet_backbone,
    build_efficientnet_two_way_fpn_backbone,
    build_two_way_fpn_backbone,
)
from .fusion import panoptic_fusion
from .instance_head import SeparableConvMaskHead, SeparableConvRPNHead
from .meta_arch import EfficientPS
from .semantic_head import EfficientPSSemSegHead
from .test_time_augmentation import EfficientPSWithTTA

__all__ = [
    "build_efficientnet_backbone",
    "build_efficientnet_two_way_fpn_backbone",
    "build_two_way_fpn_backbone",
    "panoptic_fusion",
    "SeparableConvMaskHead",
    "SeparableConvRPNHead",
    "EfficientPS",
    "EfficientPSSemSegHead",
    "EfficientPSWithTTA",
]
