"""In-place activated BatchNorm (iABN; Rota Bulò et al., CVPR 2018), EfficientPS's norm layer.

BatchNorm followed by LeakyReLU keeps two tensors per layer for the backward pass: the norm's
input and the activation's output. iABN keeps only the output, and recovers what the backward
pass needs from it: LeakyReLU is invertible (slope > 0), and so is the affine BatchNorm for a
non-zero weight, so the normalised input is ``(leaky_relu^-1(z) - bias) / weight``. The paper
trains EfficientPS with iABN for that memory; torch has no iABN, and the reference library needs
a CUDA compile, so here it is on torch's own BatchNorm kernels, for BN and synchronised BN.

:class:`InPlaceABN` is a ``BatchNorm2d`` (same parameters, buffers and state_dict keys, so
checkpoints load either way) that applies the LeakyReLU itself. In eval mode it is BatchNorm with
running statistics, then LeakyReLU, and the inference fast path folds it like any BatchNorm.
:func:`convert_to_inplace_abn` turns every BatchNorm (plain or synchronised) that a LeakyReLU
directly follows into one (MODEL.EFFICIENTPS.INPLACE_ABN).

Deviation from the reference library: it trains ``|weight| + eps`` to keep the weight invertible;
here the weight is BatchNorm's own (any sign, so ImageNet weights mean what they meant), and a
channel whose weight is below ``_MIN_WEIGHT`` in magnitude gets no useful gradient for its
weight (its input and bias still get theirs): a BatchNorm weight that small is rare, and there
is no weight decay on norms by default (SOLVER.WEIGHT_DECAY_NORM) to drive one there.
"""

from typing import Optional

import torch
import torch.distributed as dist
from detectron2.layers import Conv2d, NaiveSyncBatchNorm
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .layers import sequential_neighbours

__all__ = ["InPlaceABN", "convert_to_inplace_abn"]

# Weights smaller in magnitude are taken as this (sign kept) when inverting the affine norm.
_MIN_WEIGHT = 1e-5


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: half-precision activations, full-precision arithmetic."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _statistics_across(y: torch.Tensor, group) -> tuple:
    """Mean, biased variance and element count of each channel of ``y`` (N, C, H, W) over the
    batches of every process in ``group``, as tensors (reading the count would make every layer
    wait for the device)."""
    channels = y.shape[1]
    if y.numel():
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    else:  # no input here (a mask head without foreground ROIs): counts nothing, as SyncBN
        var = mean = y.new_zeros(channels)
    # Each process's (count, mean, variance), combined exactly (Chan et al.'s parallel variance),
    # which stays accurate where a mean is large against its deviation, unlike E[y^2] - E[y]^2.
    count = y.new_full((1,), y.numel() // channels, dtype=torch.float64)  # no upload: a fill
    local = torch.cat([count, mean.double(), var.double()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    counts, means, variances = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total.clamp(min=1)
    global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total.clamp(min=1)
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total.to(mean.dtype)


class _InPlaceABNFunction(torch.autograd.Function):
    """Training-mode ``leaky_relu(batch_norm(y))`` that saves only its output (see module doc).

    Forward and backward run torch's own BatchNorm kernels; the backward first rebuilds the norm's
    input from the output (two elementwise passes), then calls BatchNorm's backward on it.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, momentum, eps, slope, group):
        with torch.autocast(y.device.type, enabled=False):
            if group is None:
                z, mean, invstd = torch.native_batch_norm(
                    y, weight, bias, running_mean, running_var, True, momentum, eps
                )
                count = None  # the local backward kernel counts for itself
            else:
                mean, var, count = _statistics_across(_wide(y), group)
                with torch.no_grad():
                    unbiased = var * count / (count - 1).clamp(min=1)
                    # No input on any process: the statistics stay, as BatchNorm's do.
                    step = (count > 0).to(running_mean.dtype) * momentum
                    running_mean.lerp_(mean.to(running_mean.dtype), step)
                    running_var.lerp_(unbiased.to(running_var.dtype), step)
                invstd = torch.rsqrt(var + eps)
                z = F.batch_norm(y, mean, var, weight, bias, False, 0.0, eps)
            F.leaky_relu(z, slope, inplace=True)
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        ctx.slope, ctx.eps, ctx.count, ctx.group = slope, eps, count, group
        return z

    @staticmethod
    @once_differentiable  # the backward's own ops would give a wrong second derivative
    def backward(ctx, grad_z):
        z, weight, bias, mean, invstd = ctx.saved_tensors
        # d loss / d pre-activation: LeakyReLU keeps the sign, so its output tells the branch.
        grad = torch.ops.aten.leaky_relu_backward(grad_z, z, ctx.slope, True)
        y = _rebuild_input(z, weight, bias, mean, invstd, ctx.slope)
        need_y, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.group is None:
            grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad, y, weight, None, None, mean, invstd, True, ctx.eps, ctx.needs_input_grad[:3]
            )
        else:
            # The weight's and bias's gradients are this process's (DDP averages them across
            # processes, as SyncBatchNorm's); the input's needs the sums over the whole batch.
            if y.numel():
                _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                    grad, y, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
                )
            else:  # no input here: nothing to add (the kernel cannot take an empty batch)
                grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
            grad_y = None
            if need_y:
                sums = torch.stack([grad_bias, grad_weight])
                dist.all_reduce(sums, group=ctx.group)
                normalised = (_wide(y) - _per_channel(mean)) * _per_channel(invstd)
                scale = invstd * _wide(weight)
                grad_y = (
                    _wide(grad)
                    - _per_channel(sums[0] / ctx.count)
                    - normalised * _per_channel(sums[1] / ctx.count)
                ) * _per_channel(scale)
                grad_y = grad_y.to(z.dtype)
        return (
            grad_y if need_y else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _rebuild_input(z, weight, bias, mean, invstd, slope):
    """BatchNorm's input from iABN's output: LeakyReLU undone (a LeakyReLU of slope 1 / slope),
    then the affine norm, ``y = (pre - bias) / (weight * invstd) + mean``, in place."""
    pre = F.leaky_relu(z, 1.0 / slope)
    weight, bias = _wide(weight), _wide(bias)
    # A weight of (almost) zero cannot be divided by; the channel's output carries nothing of its
    # input then, and the rebuilt input only feeds the weight's own gradient (see module doc).
    weight = torch.copysign(weight.abs().clamp(min=_MIN_WEIGHT), weight)
    scale = 1.0 / (weight * invstd)
    # One pass over the activations, rounded once: pre * scale + shift, written over pre.
    shift = _per_channel(mean - bias * scale)
    return torch.addcmul(shift, pre, _per_channel(scale), out=pre)


class InPlaceABN(nn.BatchNorm2d):
    """BatchNorm2d followed by ``LeakyReLU(negative_slope)``, which in training keeps only its
    output for the backward pass (see the module docstring). With ``synchronized``, training
    statistics are those of the whole batch across the processes of ``process_group`` (the
    default group when None), as SyncBatchNorm's; alone (one process), the local batch's.

    Converters written for BatchNorm take it for one and drop its activation: Detectron2's
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` and torch's ``convert_sync_batchnorm``. Freeze
    or convert before :func:`convert_to_inplace_abn` (``EfficientNet.freeze`` refuses after)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        negative_slope: float = 0.01,
        synchronized: bool = False,
        process_group=None,
    ):
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        if negative_slope <= 0:
            raise ValueError(
                f"InPlaceABN needs a LeakyReLU slope > 0 to invert it, got {negative_slope}."
            )
        self.negative_slope = float(negative_slope)
        self.synchronized = synchronized
        self.process_group = process_group

    @classmethod
    def from_batch_norm(cls, norm: nn.modules.batchnorm._BatchNorm, negative_slope: float):
        """An InPlaceABN with ``norm``'s settings, parameters and statistics (shared)."""
        synchronized = isinstance(norm, (nn.SyncBatchNorm, NaiveSyncBatchNorm))
        abn = cls(
            norm.num_features,
            norm.eps,
            norm.momentum,
            negative_slope,
            synchronized,
            getattr(norm, "process_group", None),
        )
        abn.weight, abn.bias = norm.weight, norm.bias
        abn.running_mean, abn.running_var = norm.running_mean, norm.running_var
        abn.num_batches_tracked = norm.num_batches_tracked
        abn.train(norm.training)
        return abn

    def _group(self):
        """The process group whose batches share statistics, None for this process alone."""
        if not (self.synchronized and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"InPlaceABN expects (N, C, H, W) input, got {tuple(x.shape)}.")
        if not self.training:  # BatchNorm with running statistics, then the activation
            return F.leaky_relu(super().forward(x), self.negative_slope, inplace=True)
        group = self._group()
        if group is None:
            F._verify_batch_size(x.size())  # BatchNorm's: more than one value per channel
            if x.numel() == 0:
                # A mask head without foreground ROIs: BatchNorm keeps its statistics and gives
                # an empty output (its kernel, which iABN calls, cannot take an empty batch).
                return F.leaky_relu(super().forward(x), self.negative_slope)
        self.num_batches_tracked.add_(1)
        # BatchNorm's momentum rule: None means a cumulative average.
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _InPlaceABNFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            momentum,
            self.eps,
            self.negative_slope,
            group,
        )

    def extra_repr(self):
        return (
            f"{super().extra_repr()}, negative_slope={self.negative_slope}, "
            f"synchronized={self.synchronized}"
        )


def _convertible(norm) -> bool:
    return (
        type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm, NaiveSyncBatchNorm)
        and norm.affine
        and norm.track_running_stats
    )


def _is_leaky_relu(module) -> bool:
    return isinstance(module, nn.LeakyReLU) and module.negative_slope > 0


def convert_to_inplace_abn(module: nn.Module) -> int:
    """Replaces, in place, every BatchNorm (BatchNorm2d, SyncBatchNorm, Detectron2's
    NaiveSyncBatchNorm) directly followed by a LeakyReLU with an :class:`InPlaceABN` that takes
    over the activation; parameters and statistics are kept (state_dict keys unchanged).

    Handles Detectron2's ``Conv2d(norm=..., activation=LeakyReLU)`` and ``[..., BatchNorm2d,
    LeakyReLU]`` runs in ``nn.Sequential`` (torchvision's ``Conv2dNormActivation`` and MBConv).
    FrozenBatchNorm, GroupNorm, BatchNorm without affine parameters or running statistics, and
    norms without a LeakyReLU after them stay as they are.

    Returns:
        the number of norms replaced.
    """
    count = 0
    for conv in list(module.modules()):
        if isinstance(conv, Conv2d) and _convertible(conv.norm) and _is_leaky_relu(conv.activation):
            conv.norm = InPlaceABN.from_batch_norm(conv.norm, conv.activation.negative_slope)
            conv.activation = None
            count += 1
    for parent, name, following in sequential_neighbours(module):
        norm, activation = parent._modules[name], parent._modules[following]
        if _convertible(norm) and _is_leaky_relu(activation):
            parent._modules[name] = InPlaceABN.from_batch_norm(norm, activation.negative_slope)
            parent._modules[following] = nn.Identity()
            count += 1
    return count
