"""EfficientPS's 2-way FPN: a top-down and a bottom-up path, summed at every level."""

import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from ..layers import add_into, add_upsampled_into, conv_norm_act


class TwoWayFPN(Backbone):
    """Feature pyramid with two parallel aggregation paths (Mohan & Valada, 2021, sec. 3.1).

    Each input level gets two 1x1 lateral convs (one per path). The top-down path starts at the
    coarsest level and adds nearest-upsampled coarser features to each finer lateral; the
    bottom-up path starts at the finest level and adds max-pooled finer features to each coarser
    lateral. The two paths are summed per level and smoothed by a 3x3 conv.

    ``forward(x)`` returns {"p2": stride 4, "p3": 8, "p4": 16, "p5": 32 [, "p6": 64]}, each with
    ``out_channels`` channels, so Detectron2's RPN and ROI heads read it like its own FPN.

    The bottom-up network is any backbone with outputs at strides 4, 8, 16 and 32; its weights are
    ``bottom_up.*`` in the state dict, whichever network it is.
    """

    def __init__(self, *, bottom_up, in_features, out_channels=256, norm="BN", top_block=False):
        """
        Args:
            bottom_up: any Detectron2 ``Backbone`` (it needs ``output_shape()``) whose outputs
                include four feature maps at strides 4, 8, 16 and 32, e.g. :class:`EfficientNet`
                ("stride4" ... "stride32") or Detectron2's ``ResNet`` ("res2" ... "res5").
            in_features: the names of those four outputs, finest first.
            out_channels: channels of every output level.
            norm: norm after every conv (then LeakyReLU), as for ``get_norm``, plus "" and any GN.
            top_block: add a "p6" level (stride 64) max-pooled from "p5".
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        check_bottom_up_features(bottom_up, shapes, in_features)
        strides = [shapes[f].stride for f in in_features]
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
            top_down[i] = add_upsampled_into(lateral, top_down[i + 1])

        bottom_up = [self.bottom_up_laterals[0](inputs[0])]
        for i in range(1, len(inputs)):
            lateral = self.bottom_up_laterals[i](inputs[i])
            bottom_up.append(add_into(lateral, _downsample_to(bottom_up[-1], lateral.shape[-2:])))

        # Both paths are complete: each top-down sum may take in its bottom-up one (in inference,
        # where add_into writes into the first; the laterals are the convs' own new outputs).
        outputs = [
            conv(add_into(td, bu)) for conv, td, bu in zip(self.output_convs, top_down, bottom_up)
        ]
        if self.top_block is not None:
            outputs.extend(self.top_block(outputs[-1]))
        return dict(zip(self._out_features, outputs))


def _downsample_to(x, size):
    """2x max-pool; ceil mode gives the same sizes as the trunk's padded stride-2 convs."""
    pooled = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    if pooled.shape[-2:] != size:  # inputs not of the trunk's making (e.g. uneven custom features)
        pooled = F.interpolate(pooled, size=size, mode="nearest")
    return pooled


# The levels the 2-way FPN (and EfficientPS's heads, which read p2-p5) are defined on.
REQUIRED_STRIDES = (4, 8, 16, 32)


def check_bottom_up_features(bottom_up, shapes, in_features):
    """Raises ValueError unless ``in_features`` names four outputs of ``bottom_up`` (whose
    ``output_shape()`` is ``shapes``) at strides 4, 8, 16 and 32, finest first.

    The message names MODEL.TWO_WAY_FPN.IN_FEATURES, what the backbone outputs (names and strides)
    and what is wrong, so a backbone that cannot feed the FPN is refused before any work.
    """
    in_features = list(in_features)
    missing = [f for f in in_features if f not in shapes]
    strides = [shapes[f].stride for f in in_features if f in shapes]
    if not missing and tuple(strides) == REQUIRED_STRIDES:
        return
    found = ", ".join(f"'{name}' (stride {spec.stride})" for name, spec in shapes.items())
    if missing:
        problem = f"it does not output {missing}"
    elif len(in_features) != len(REQUIRED_STRIDES):
        problem = f"{len(in_features)} features are named, the FPN needs {len(REQUIRED_STRIDES)}"
    else:
        problem = f"the named features have strides {strides}"
    raise ValueError(
        f"The 2-way FPN needs four bottom-up features at strides {list(REQUIRED_STRIDES)}, named "
        f"finest first in MODEL.TWO_WAY_FPN.IN_FEATURES (now {in_features}). The bottom-up "
        f"backbone ({type(bottom_up).__name__}, built by MODEL.TWO_WAY_FPN.BOTTOM_UP) outputs "
        f"{found or 'nothing'}: {problem}. Name its stride 4-32 outputs in "
        "MODEL.TWO_WAY_FPN.IN_FEATURES, or make it output them (e.g. MODEL.RESNETS.OUT_FEATURES: "
        "[res2, res3, res4, res5], MODEL.EFFICIENTNET.OUT_FEATURES: [stride4, ..., stride32])."
    )


# Builders that return a 2-way FPN: never a bottom-up network themselves.
_TWO_WAY_FPN_BUILDERS = ("build_two_way_fpn_backbone", "build_efficientnet_two_way_fpn_backbone")


def build_bottom_up(cfg, input_shape):
    """The bottom-up backbone that MODEL.TWO_WAY_FPN.BOTTOM_UP names in BACKBONE_REGISTRY."""
    name = cfg.MODEL.TWO_WAY_FPN.BOTTOM_UP
    registered = sorted(key for key, _ in BACKBONE_REGISTRY)
    if name in _TWO_WAY_FPN_BUILDERS or name not in registered:
        raise ValueError(
            f"MODEL.TWO_WAY_FPN.BOTTOM_UP must name a bottom-up backbone builder registered in "
            f"Detectron2's BACKBONE_REGISTRY (other than {list(_TWO_WAY_FPN_BUILDERS)}), got "
            f"'{name}'. Registered: {[k for k in registered if k not in _TWO_WAY_FPN_BUILDERS]}. "
            "Register your own with @BACKBONE_REGISTRY.register() before building the model."
        )
    bottom_up = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(bottom_up, "output_shape", None)):
        raise ValueError(
            f"MODEL.TWO_WAY_FPN.BOTTOM_UP '{name}' returned a {type(bottom_up).__name__}, which "
            "has no output_shape(): the builder must return a detectron2.modeling.Backbone."
        )
    return bottom_up


@BACKBONE_REGISTRY.register()
def build_two_way_fpn_backbone(cfg, input_shape):
    """2-way FPN on the bottom-up backbone named by MODEL.TWO_WAY_FPN.BOTTOM_UP
    (MODEL.BACKBONE.NAME: "build_two_way_fpn_backbone"), e.g. "build_efficientnet_backbone" or
    Detectron2's "build_resnet_backbone", with MODEL.TWO_WAY_FPN.IN_FEATURES naming its outputs
    at strides 4, 8, 16, 32."""
    c = cfg.MODEL.TWO_WAY_FPN
    return TwoWayFPN(
        bottom_up=build_bottom_up(cfg, input_shape),
        in_features=c.IN_FEATURES,
        out_channels=c.OUT_CHANNELS,
        norm=c.NORM,
        top_block=c.TOP_BLOCK,
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_two_way_fpn_backbone(cfg, input_shape):
    """EfficientNet + 2-way FPN (MODEL.BACKBONE.NAME: "build_efficientnet_two_way_fpn_backbone").

    The same model (and parameter names) as ``build_two_way_fpn_backbone`` with
    MODEL.TWO_WAY_FPN.BOTTOM_UP "build_efficientnet_backbone"; kept for configs that name it.
    """
    name = cfg.MODEL.TWO_WAY_FPN.BOTTOM_UP
    if name != "build_efficientnet_backbone":
        raise ValueError(
            "MODEL.BACKBONE.NAME 'build_efficientnet_two_way_fpn_backbone' always builds "
            f"EfficientNet, but MODEL.TWO_WAY_FPN.BOTTOM_UP is '{name}': set MODEL.BACKBONE.NAME "
            "to 'build_two_way_fpn_backbone' to build the 2-way FPN on it."
        )
    return build_two_way_fpn_backbone(cfg, input_shape)
