"""Small building blocks shared by EfficientPS's modules."""

import functools
import math

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def leaky_relu(slope=0.01):
    """The activation that follows every norm in EfficientPS (the paper's iABN uses slope 0.01)."""
    return nn.LeakyReLU(slope, inplace=True)


def norm_layer(norm, channels):
    """``get_norm`` that also accepts "" (no norm) and any channel count for "GN".

    Detectron2's "GN" always uses 32 groups, which EfficientNet's 40- or 24-channel stages cannot
    divide; here GN uses the largest group count <= 32 that divides ``channels``.
    """
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if not norm:
        return nn.Identity()
    return get_norm(norm, channels)


def norm_factory(norm):
    """``norm_layer`` as a one-argument factory, the form torchvision's blocks expect."""
    return functools.partial(norm_layer, norm)


def conv_norm_act(in_channels, out_channels, kernel_size, *, norm, slope=0.01, **conv_kwargs):
    """Conv -> norm -> LeakyReLU, with the bias dropped when a norm follows."""
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=conv_kwargs.pop("padding", (kernel_size // 2) * conv_kwargs.get("dilation", 1)),
        bias=not norm,
        norm=norm_layer(norm, out_channels),
        activation=leaky_relu(slope),
        **conv_kwargs,
    )


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk conv -> norm -> act, then pointwise 1x1 conv -> norm -> act.

    ``dilation`` may be an int or an (h, w) pair, as the DPC's anisotropic rates need.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size=3, *, dilation=1, norm="BN", slope=0.01
    ):
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        super().__init__(
            conv_norm_act(
                in_channels,
                in_channels,
                kernel_size,
                norm=norm,
                slope=slope,
                padding=((kernel_size // 2) * dh, (kernel_size // 2) * dw),
                dilation=(dh, dw),
                groups=in_channels,
            ),
            conv_norm_act(in_channels, out_channels, 1, norm=norm, slope=slope),
        )
        self.out_channels = out_channels


# -------------------------------------------------------------------------------------------------
# Inference fast path: BatchNorm folded into the preceding conv, conv + LeakyReLU fused.
# -------------------------------------------------------------------------------------------------

# oneDNN's fused "conv + unary op" kernel (the one Inductor emits on CPU); absent in some builds.
_FUSED_CONV_OP = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


class ConvLeakyReLU(nn.Module):
    """Inference-only ``leaky_relu(conv(x))``, one fused oneDNN kernel on CPU for float32.

    Elsewhere (GPU, other dtypes, autograd, empty inputs) it runs the conv and the activation one
    after the other. Built by :func:`fuse_conv_leaky_relu`; the conv must have no norm/activation.
    """

    def __init__(self, conv: nn.Conv2d, negative_slope: float):
        super().__init__()
        if getattr(conv, "norm", None) is not None or getattr(conv, "activation", None) is not None:
            raise ValueError("ConvLeakyReLU needs a conv without its own norm or activation.")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ConvLeakyReLU supports numeric zero padding only.")
        self.conv = conv
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        conv = self.conv
        if (
            _FUSED_CONV_OP is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        ):
            return _FUSED_CONV_OP(
                x,
                conv.weight,
                conv.bias,
                list(conv.padding),
                list(conv.stride),
                list(conv.dilation),
                conv.groups,
                "leaky_relu",
                [self.negative_slope],
                "",
            )
        return F.leaky_relu(conv(x), self.negative_slope, inplace=True)


def _is_foldable_norm(module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (
        isinstance(module, _BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


@torch.no_grad()
def _fold_norm_into_conv(conv: nn.Conv2d, norm) -> None:
    """conv <- norm(conv(.)) with the norm's running statistics (its inference behaviour)."""
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    conv_bias = conv.bias.double() if conv.bias is not None else 0.0
    new_bias = (conv_bias - norm.running_mean.double()) * scale + bias.double()
    new_weight = torch.empty_like(conv.weight)  # keeps the weight's memory format
    new_weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
    conv.weight = nn.Parameter(new_weight, requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def _is_plain_conv(module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and getattr(module, "norm", None) is None
        and getattr(module, "activation", None) is None
    )


def fold_batch_norms(module: nn.Module) -> int:
    """Folds, in place, every BatchNorm that directly follows a conv into that conv.

    Handles Detectron2's ``Conv2d(norm=...)`` (BN, SyncBN, FrozenBN; GN cannot be folded) and
    ``[Conv2d, BatchNorm2d, ...]`` runs in ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, EfficientNet's blocks). The folded conv computes the norm's
    inference-mode output (running statistics), so the module is for inference only afterwards.

    Returns:
        the number of norms folded.
    """
    count = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Conv2d) and _is_foldable_norm(getattr(parent, "norm", None)):
            _fold_norm_into_conv(parent, parent.norm)
            parent.norm = None
            count += 1
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for previous, name in zip(names, names[1:]):
                conv, norm = parent._modules[previous], parent._modules[name]
                if _is_plain_conv(conv) and _is_foldable_norm(norm):
                    _fold_norm_into_conv(conv, norm)
                    parent._modules[name] = nn.Identity()
                    count += 1
    return count


def fuse_conv_leaky_relu(module: nn.Module) -> int:
    """Replaces, in place, each conv directly followed by a LeakyReLU with a :class:`ConvLeakyReLU`.

    Handles Detectron2's ``Conv2d(activation=nn.LeakyReLU)`` without norm (fold the norms first)
    and ``[Conv2d, (Identity ...,) LeakyReLU]`` runs in ``nn.Sequential``.

    Returns:
        the number of convs fused.
    """
    count = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if (
                isinstance(child, nn.Conv2d)
                and getattr(child, "norm", None) is None
                and isinstance(getattr(child, "activation", None), nn.LeakyReLU)
            ):
                slope = child.activation.negative_slope
                child.activation = None
                parent._modules[name] = ConvLeakyReLU(child, slope)
                count += 1
            elif isinstance(parent, nn.Sequential) and _is_plain_conv(child):
                j = i + 1
                while j < len(names) and isinstance(parent._modules[names[j]], nn.Identity):
                    j += 1
                if j < len(names) and isinstance(parent._modules[names[j]], nn.LeakyReLU):
                    slope = parent._modules[names[j]].negative_slope
                    parent._modules[name] = ConvLeakyReLU(child, slope)
                    parent._modules[names[j]] = nn.Identity()
                    count += 1
    return count


@torch.no_grad()
def fuse_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Turns ``model`` (in place) into a faster, inference-only equivalent, and returns it.

    BatchNorms are folded into their convs (:func:`fold_batch_norms`), conv + LeakyReLU pairs
    fused (:func:`fuse_conv_leaky_relu`), weights made channels-last (``channels_last``), gradients
    turned off and the model put in eval mode. Outputs equal the original's in eval mode within
    float rounding. Works on any Detectron2 model (Panoptic FPN's FrozenBN convs fold too); the
    BatchNorms are gone afterwards, so do not train the result.
    """
    model.eval()
    fold_batch_norms(model)
    fuse_conv_leaky_relu(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    return model
