"""Small building blocks shared by EfficientPS's modules."""

import functools
import math

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn


def sequential_neighbours(module: nn.Module):
    """(parent, name, next name) for every two adjacent children of each ``nn.Sequential`` in
    ``module``: where a conv, norm and activation run one after the other in torchvision's
    blocks. The names are listed up front; read the children by name, as they may be replaced."""
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for name, following in zip(names, names[1:]):
                yield parent, name, following


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


def _may_overwrite(x, y) -> bool:
    """Whether a sum of ``x`` and ``y`` may be written into ``x``, an intermediate that nothing
    reads afterwards: autograd does not need ``x`` (it may have saved it, e.g. a LeakyReLU's
    output), the sum keeps ``x``'s dtype, and no ``torch.jit`` trace records it (an ONNX export
    of an in-place add into a view is not faithful)."""
    return (
        not (torch.is_grad_enabled() and x.requires_grad)
        and x.dtype == y.dtype
        and not torch.jit.is_tracing()
    )


def add_into(x, y):
    """``x + y``, computed in place into ``x`` (a fresh intermediate that nothing else reads) where
    :func:`_may_overwrite` allows: the same values without a new tensor, whose memory the CPU
    maps in page by page (at 1024x2048 a 256-channel stride-4 map is 134 MB: adding into one
    takes 7 ms, into a new one 41 ms). A forward hook that keeps the module output ``x`` (in
    inference) sees it overwritten."""
    return x.add_(y) if x.shape == y.shape and _may_overwrite(x, y) else x + y


def add_upsampled_into(x, coarse):
    """``x + interpolate(coarse, size=x.shape[-2:], mode="nearest")``, into ``x`` as
    :func:`add_into`. Where ``x`` is exactly twice ``coarse``'s size, each value of ``coarse`` is
    added to its 2x2 block of ``x`` through a broadcast view, without the upsampled map: the nearest
    interpolation's values (its source pixel is then ``i // 2`` exactly), added in the same order.
    """
    n, c, h, w = x.shape
    if (
        tuple(coarse.shape) == (n, c, h // 2, w // 2)
        and h % 2 == 0
        and w % 2 == 0
        and _may_overwrite(x, coarse)
        # CUDA autocast runs nearest upsampling in float32, and the sum is float32 there.
        and not (x.is_cuda and torch.is_autocast_enabled("cuda"))
    ):
        x.view(n, c, h // 2, 2, w // 2, 2).add_(coarse[:, :, :, None, :, None])
        return x
    return add_into(x, F.interpolate(coarse, size=(h, w), mode="nearest"))
