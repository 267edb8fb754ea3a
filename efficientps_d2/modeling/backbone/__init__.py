from .efficientnet import EfficientNet, build_efficientnet_backbone
from .two_way_fpn import (
    TwoWayFPN,
    build_efficientnet_two_way_fpn_backbone,
    build_two_way_fpn_backbone,
)

__all__ = [
    "EfficientNet",
    "TwoWayFPN",
    "build_efficientnet_backbone",
    "build_efficientnet_two_way_fpn_backbone",
    "build_two_way_fpn_backbone",
]
