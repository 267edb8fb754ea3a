"""EfficientNet trunk as modified by EfficientPS: no squeeze-and-excitation, norm + LeakyReLU.

Built from torchvision's own EfficientNet blocks (``MBConv``, ``MBConvConfig``,
``_efficientnet_conf``), so the compound scaling of B0-B7 is torchvision's and the module names
match torchvision's ``features.*`` state-dict keys: ImageNet weights convert by name (SE weights
are skipped, because SE is replaced in place by an identity that keeps the block indices).
"""

import copy

import torch.utils.checkpoint
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.models.efficientnet import _efficientnet_conf
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from ..inplace_abn import InPlaceABN
from ..layers import norm_factory

VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7")
# Width/depth multipliers of the compound scaling (Tan & Le, 2019), as torchvision defines them.
_SCALING = {
    "b0": (1.0, 1.0),
    "b1": (1.0, 1.1),
    "b2": (1.1, 1.2),
    "b3": (1.2, 1.4),
    "b4": (1.4, 1.8),
    "b5": (1.6, 2.2),
    "b6": (1.8, 2.6),
    "b7": (2.0, 3.1),
}
# Index in ``features`` whose output ends each stride; stride 32 ends with the 1x1 head conv.
_STAGE_END = {"stride2": 1, "stride4": 2, "stride8": 3, "stride16": 5, "stride32": 8}
_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "")


class _NoSqueezeExcitation(nn.Identity):
    """Stands where torchvision's MBConv puts SE, so later block indices (and weight names) stay."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class EfficientNet(Backbone):
    """EfficientNet B0-B7 feature extractor returning the stage ends at the requested strides.

    ``forward(x)`` takes ``x`` of shape (N, 3, H, W) and returns a dict mapping each name in
    ``out_features`` ("stride4", "stride8", "stride16", "stride32") to a (N, C, H/s, W/s) tensor.
    """

    def __init__(
        self,
        variant="b5",
        *,
        norm="BN",
        leaky_relu_slope=0.01,
        squeeze_excitation=False,
        stochastic_depth_prob=0.2,
        out_features=("stride4", "stride8", "stride16", "stride32"),
        freeze_at=0,
        activation_checkpointing=False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"MODEL.EFFICIENTNET.VARIANT must be one of {list(VARIANTS)}, got '{variant}'."
            )
        if norm not in _NORMS:
            raise ValueError(
                f"MODEL.EFFICIENTNET.NORM must be one of {list(_NORMS)}, got '{norm}'."
            )
        unknown = [f for f in out_features if f not in _STAGE_END]
        if unknown:
            raise ValueError(
                f"MODEL.EFFICIENTNET.OUT_FEATURES may only name {list(_STAGE_END)}, got {unknown}."
            )
        width, depth = _SCALING[variant]
        blocks_config, _ = _efficientnet_conf(
            f"efficientnet_{variant}", width_mult=width, depth_mult=depth
        )
        make_norm = norm_factory(norm)
        stem_channels = blocks_config[0].input_channels
        layers = [Conv2dNormActivation(3, stem_channels, 3, stride=2, norm_layer=make_norm)]
        # (The stem's and head's default ReLU, like MBConv's SiLU, becomes LeakyReLU just below.)
        total_blocks = sum(c.num_layers for c in blocks_config)
        block_index = 0
        se_layer = {} if squeeze_excitation else {"se_layer": _NoSqueezeExcitation}
        for stage_config in blocks_config:
            stage = []
            for i in range(stage_config.num_layers):
                block_config = _repeat_config(stage_config, first=i == 0)
                drop = stochastic_depth_prob * block_index / total_blocks
                stage.append(block_config.block(block_config, drop, make_norm, **se_layer))
                block_index += 1
            layers.append(nn.Sequential(*stage))
        head_in = blocks_config[-1].out_channels
        layers.append(Conv2dNormActivation(head_in, 4 * head_in, 1, norm_layer=make_norm))
        self.features = nn.Sequential(*layers)
        # The paper swaps EfficientNet's SiLU for iABN's LeakyReLU(0.01) everywhere. SE (when kept)
        # keeps its own gating as in ImageNet EfficientNet.
        _replace_silu(self.features, leaky_relu_slope)
        self._init_weights()

        self._out_features = list(out_features)
        channels = {"stride2": blocks_config[0].out_channels}
        channels.update(
            stride4=blocks_config[1].out_channels,
            stride8=blocks_config[2].out_channels,
            stride16=blocks_config[4].out_channels,
            stride32=4 * head_in,
        )
        self._out_feature_channels = {k: channels[k] for k in self._out_features}
        self._out_feature_strides = {k: int(k[len("stride") :]) for k in self._out_features}
        self._last_index = max(_STAGE_END[k] for k in self._out_features)
        self.activation_checkpointing = activation_checkpointing
        self.freeze(freeze_at)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def freeze(self, freeze_at=0):
        """Freezes the stem (1) and the first ``freeze_at - 1`` MBConv stages, BN included."""
        for index in range(min(freeze_at, len(self.features))):
            module = self.features[index]
            if any(isinstance(m, InPlaceABN) for m in module.modules()):
                # FrozenBatchNorm would take it for a BatchNorm and drop its LeakyReLU.
                raise ValueError(
                    "EfficientNet.freeze after MODEL.EFFICIENTPS.INPLACE_ABN converted the norms: "
                    "freeze first (MODEL.EFFICIENTNET.FREEZE_AT does)."
                )
            for p in module.parameters():
                p.requires_grad = False
            self.features[index] = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        return self

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNet expects (N, 3, H, W) input, got {tuple(x.shape)}.")
        wanted = {_STAGE_END[k]: k for k in self._out_features}
        outputs = {}
        for index, module in enumerate(self.features[: self._last_index + 1]):
            if self.activation_checkpointing and self.training and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
            if index in wanted:
                outputs[wanted[index]] = x
        return outputs


def _repeat_config(stage_config, first):
    """The config of one block in a stage: only the first block changes channels and stride."""
    block_config = copy.copy(stage_config)
    if not first:
        block_config.input_channels = block_config.out_channels
        block_config.stride = 1
    return block_config


def _replace_silu(module, slope):
    """Replaces every SiLU/ReLU outside squeeze-and-excitation modules by LeakyReLU(slope)."""
    for name, child in module.named_children():
        if isinstance(child, SqueezeExcitation):
            continue
        if isinstance(child, (nn.SiLU, nn.ReLU)):
            setattr(module, name, nn.LeakyReLU(slope, inplace=True))
        else:
            _replace_silu(child, slope)


@BACKBONE_REGISTRY.register()
def build_efficientnet_backbone(cfg, input_shape):
    """The EfficientNet trunk alone (MODEL.BACKBONE.NAME: "build_efficientnet_backbone")."""
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet needs 3 input channels, got {input_shape.channels}.")
    c = cfg.MODEL.EFFICIENTNET
    return EfficientNet(
        c.VARIANT.lower(),
        norm=c.NORM,
        leaky_relu_slope=c.LEAKY_RELU_SLOPE,
        squeeze_excitation=c.SQUEEZE_EXCITATION,
        stochastic_depth_prob=c.STOCHASTIC_DEPTH_PROB,
        out_features=c.OUT_FEATURES,
        freeze_at=c.FREEZE_AT,
        activation_checkpointing=c.ACTIVATION_CHECKPOINTING,
    )
