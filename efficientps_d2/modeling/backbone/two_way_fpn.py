"""EfficientPS's 2-way FPN: a top-down and a bottom-up path, summed at every level."""

import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from ..layers import conv_norm_act
from .efficientnet import build_efficientnet_backbone


class TwoWayFPN(Backbone):
    """Feature pyramid with two parallel aggregation paths (Mohan & Valada, 2021, sec. 3.1).

    Each input level gets two 1x1 lateral convs (one per path). The top-down path starts at the
    coarsest level and adds nearest-upsampled coarser features to each finer lateral; the
    bottom-up path starts at the finest level and adds max-pooled finer features to each coarser
    lateral. The two paths are summed per level and smoothed by a 3x3 conv.

    ``forward(x)`` returns {"p2": stride 4, "p3": 8, "p4": 16, "p5": 32 [, "p6": 64]}, each with
    ``out_channels`` channels, so Detectron2's RPN and ROI heads read it like its own FPN.
    """

    def __init__(self, *, bottom_up, in_features, out_channels=256, norm="BN", top_block=False):
        super().__init__()
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.TWO_WAY_FPN.IN_FEATURES names {missing}, which the backbone does not "
                f"output (it outputs {list(shapes)})."
            )
        strides = [shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(
                "MODEL.TWO_WAY_FPN.IN_FEATURES must be finest first with strides doubling, got "
                f"strides {strides}."
            )
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.top_down_laterals = nn.ModuleList(
            conv_norm_act(shapes[f].channels, out_channels, 1, norm=norm) for f in in_features
        )
        self.bottom_up_laterals = nn.ModuleList(
            conv_norm_act(shapes[f].channels, out_channels, 1, norm=norm) for f in in_features
        )
        self.output_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=norm) for _ in in_features
        )
        # Detectron2 FPN's own "p6": a 1x1 max-pool of stride 2 on the coarsest output.
        self.top_block = LastLevelMaxPool() if top_block else None
        levels = [int(s).bit_length() - 1 for s in strides]
        self._out_features = [f"p{level}" for level in levels]
        self._out_feature_strides = {f"p{lv}": 2**lv for lv in levels}
        if top_block:
            self._out_features.append(f"p{levels[-1] + 1}")
            self._out_feature_strides[self._out_features[-1]] = 2 ** (levels[-1] + 1)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = max(self._out_feature_strides.values())

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def forward(self, x):
        features = self.bottom_up(x)
        inputs = [features[f] for f in self.in_features]

        top_down = [None] * len(inputs)
        top_down[-1] = self.top_down_laterals[-1](inputs[-1])
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.top_down_laterals[i](inputs[i])
            top_down[i] = lateral + F.interpolate(
                top_down[i + 1], size=lateral.shape[-2:], mode="nearest"
            )

        bottom_up = [self.bottom_up_laterals[0](inputs[0])]
        for i in range(1, len(inputs)):
            lateral = self.bottom_up_laterals[i](inputs[i])
            bottom_up.append(lateral + _downsample_to(bottom_up[-1], lateral.shape[-2:]))

        outputs = [conv(td + bu) for conv, td, bu in zip(self.output_convs, top_down, bottom_up)]
        if self.top_block is not None:
            outputs.extend(self.top_block(outputs[-1]))
        return dict(zip(self._out_features, outputs))


def _downsample_to(x, size):
    """2x max-pool; ceil mode gives the same sizes as the trunk's padded stride-2 convs."""
    pooled = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if pooled.shape[-2:] != size:  # inputs not of the trunk's making (e.g. uneven custom features)
        pooled = F.interpolate(pooled, size=size, mode="nearest")
    return pooled


@BACKBONE_REGISTRY.register()
def build_efficientnet_two_way_fpn_backbone(cfg, input_shape):
    """EfficientNet + 2-way FPN (MODEL.BACKBONE.NAME: "build_efficientnet_two_way_fpn_backbone")."""
    c = cfg.MODEL.TWO_WAY_FPN
    return TwoWayFPN(
        bottom_up=build_efficientnet_backbone(cfg, input_shape),
        in_features=c.IN_FEATURES,
        out_channels=c.OUT_CHANNELS,
        norm=c.NORM,
        top_block=c.TOP_BLOCK,
    )
