"""EfficientPS's semantic head: DPC on the coarse levels, LSFE on the fine ones, joined by MC.

Predicts every class (stuff and things) and is trained with a cross-entropy averaged over the
hardest pixels only (Mohan & Valada, 2021, sec. 3.3).
"""

import math
from typing import Dict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from .layers import SeparableConv2d, add_into, conv_norm_act

# (height, width) dilation of each DPC branch, from the paper.
DPC_DILATIONS = ((1, 6), (1, 1), (6, 21), (18, 15), (6, 3))
# Which earlier output each DPC branch reads: -1 is the cell's input, k is branch k's output.
DPC_BRANCH_INPUTS = (-1, 0, 0, 0, 3)


class DensePredictionCell(nn.Module):
    """Five separable 3x3 branches with anisotropic dilations, concatenated and reduced by a 1x1."""

    def __init__(self, in_channels, out_channels, *, branch_channels=256, norm="BN"):
        super().__init__()
        self.branches = nn.ModuleList()
        for reads, dilation in zip(DPC_BRANCH_INPUTS, DPC_DILATIONS):
            branch_in = in_channels if reads < 0 else branch_channels
            self.branches.append(
                SeparableConv2d(branch_in, branch_channels, dilation=dilation, norm=norm)
            )
        self.reduce = conv_norm_act(
            len(DPC_DILATIONS) * branch_channels, out_channels, 1, norm=norm
        )

    def forward(self, x):
        outputs = []
        for reads, branch in zip(DPC_BRANCH_INPUTS, self.branches):
            outputs.append(branch(x if reads < 0 else outputs[reads]))
        return self.reduce(torch.cat(outputs, dim=1))


class LargeScaleFeatureExtractor(nn.Sequential):
    """Two separable 3x3 convs that bring a fine FPN level to the head's width."""

    def __init__(self, in_channels, out_channels, *, norm="BN"):
        super().__init__(
            SeparableConv2d(in_channels, out_channels, norm=norm),
            SeparableConv2d(out_channels, out_channels, norm=norm),
        )


class MismatchCorrection(nn.Module):
    """Two separable 3x3 convs, then bilinear upsampling to the next finer level's size."""

    def __init__(self, channels, *, norm="BN"):
        super().__init__()
        self.convs = nn.Sequential(
            SeparableConv2d(channels, channels, norm=norm),
            SeparableConv2d(channels, channels, norm=norm),
        )

    def forward(self, x, size):
        return F.interpolate(self.convs(x), size=size, mode="bilinear", align_corners=False)


def _call(module, *args):
    return module(*args)


def _checkpointed(module, *args):
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


NORMALIZATIONS = ("image", "labelled")


def _check_hard_pixel_settings(fraction, normalization):
    if not 0 < fraction <= 1:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.HARD_PIXEL_FRACTION must be in (0, 1], got {fraction}."
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.HARD_PIXEL_NORMALIZATION must be one of {list(NORMALIZATIONS)}, "
            f"got '{normalization}'."
        )


def hard_pixel_cross_entropy(
    logits, targets, *, ignore_value, hard_pixel_fraction, normalization="image", image_sizes=None
):
    """Cross-entropy averaged over each image's hardest ``hard_pixel_fraction`` of its pixels.

    With ``normalization="image"`` this is the paper's weighting w = 4/(H*W) on the worst quarter
    of the image's H*W pixels and 0 elsewhere, as in the official code: unlabelled pixels count,
    with zero loss. With "labelled" the fraction is of the labelled pixels only.

    Args:
        logits: (N, C, H, W); targets: (N, H, W) long, ``ignore_value`` where unlabelled.
        normalization: "image" or "labelled" (MODEL.SEM_SEG_HEAD.HARD_PIXEL_NORMALIZATION).
        image_sizes: (h, w) of each image before padding to (H, W), for "image"; None: H*W.
    Returns:
        scalar tensor; zero (still differentiable) when no pixel is labelled.
    """
    _check_hard_pixel_settings(hard_pixel_fraction, normalization)
    pixel_losses = F.cross_entropy(
        logits, targets, reduction="none", ignore_index=ignore_value
    ).flatten(1)
    if normalization == "labelled":
        counts = (targets != ignore_value).flatten(1).sum(dim=1).tolist()
    elif image_sizes is not None:
        counts = [int(h) * int(w) for h, w in image_sizes]
    else:
        counts = [targets.shape[-2] * targets.shape[-1]] * targets.shape[0]
    per_image = []
    for losses, count in zip(pixel_losses, counts):
        k = math.ceil(hard_pixel_fraction * count)
        if k == 0:
            per_image.append(losses.sum() * 0.0)
        else:
            per_image.append(losses.topk(k, sorted=False).values.mean())
    return torch.stack(per_image).mean()


@SEM_SEG_HEADS_REGISTRY.register()
class EfficientPSSemSegHead(nn.Module):
    """The semantic head (MODEL.SEM_SEG_HEAD.NAME: "EfficientPSSemSegHead").

    ``forward(features, targets=None)`` reads the four FPN levels named in ``in_features``
    (strides 4, 8, 16, 32). It returns ``(logits, {})`` in inference, logits of shape
    (N, num_classes, H, W) at the padded input size, and ``(None, {"loss_sem_seg": loss})`` in
    training, where ``targets`` is (N, H, W) long with ``ignore_value`` for unlabelled pixels and
    ``image_sizes`` the (h, w) of each image before padding (for the loss's normalisation).
    As in Detectron2's heads, ``layers`` is the network and ``losses`` the training loss.

    With ``activation_checkpointing`` the DPC, LSFE, MC and prediction blocks recompute their
    activations in the backward pass instead of keeping them (less training memory, more time).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes,
        convs_dim=128,
        dpc_channels=256,
        norm="BN",
        ignore_value=255,
        loss_weight=1.0,
        hard_pixel_fraction=0.25,
        hard_pixel_normalization="image",
        activation_checkpointing=False,
    ):
        super().__init__()
        if len(input_shape) != 4:
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.IN_FEATURES must name 4 feature maps (strides 4, 8, 16, 32), "
                f"got {list(input_shape)}."
            )
        shapes = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in shapes]
        strides = [s.stride for _, s in shapes]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES must have doubling strides, got {strides}."
            )
        self.common_stride = strides[0]
        c4, c8, c16, c32 = (s.channels for _, s in shapes)
        self.dpc32 = DensePredictionCell(c32, convs_dim, branch_channels=dpc_channels, norm=norm)
        self.dpc16 = DensePredictionCell(c16, convs_dim, branch_channels=dpc_channels, norm=norm)
        self.lsfe8 = LargeScaleFeatureExtractor(c8, convs_dim, norm=norm)
        self.lsfe4 = LargeScaleFeatureExtractor(c4, convs_dim, norm=norm)
        self.mc16to8 = MismatchCorrection(convs_dim, norm=norm)
        self.mc8to4 = MismatchCorrection(convs_dim, norm=norm)
        self.predictor = Conv2d(4 * convs_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        self.num_classes = num_classes
        self.convs_dim = convs_dim
        self.activation_checkpointing = activation_checkpointing
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        # At build time, not at the first training step.
        _check_hard_pixel_settings(hard_pixel_fraction, hard_pixel_normalization)
        self.hard_pixel_fraction = hard_pixel_fraction
        self.hard_pixel_normalization = hard_pixel_normalization

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in head.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not "
                f"output (it outputs {list(input_shape)})."
            )
        return {
            "input_shape": {k: input_shape[k] for k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "convs_dim": head.CONVS_DIM,
            "dpc_channels": head.DPC_CHANNELS,
            "norm": head.NORM,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "hard_pixel_fraction": head.HARD_PIXEL_FRACTION,
            "hard_pixel_normalization": head.HARD_PIXEL_NORMALIZATION,
            "activation_checkpointing": head.ACTIVATION_CHECKPOINTING,
        }

    def layers(self, features):
        """Stride-4 logits (N, num_classes, H/4, W/4) from the FPN features."""
        p4, p8, p16, p32 = (features[f] for f in self.in_features)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            run = _checkpointed
        else:
            run = _call
        dpc32, dpc16 = run(self.dpc32, p32), run(self.dpc16, p16)
        coarse = dpc16 + F.interpolate(dpc32, size=dpc16.shape[-2:], mode="bilinear")
        # (dpc16 is read again by _predict: coarse is a new tensor; the LSFE outputs are not.)
        f8 = add_into(run(self.lsfe8, p8), run(self.mc16to8, coarse, p8.shape[-2:]))
        f4 = add_into(run(self.lsfe4, p4), run(self.mc8to4, f8, p4.shape[-2:]))
        return run(self._predict, dpc32, dpc16, f8, f4)

    def _predict(self, dpc32, dpc16, f8, f4):
        """``predictor(cat([up(dpc32), up(dpc16), up(f8), f4]))``, computed without the concat.

        A 1x1 conv commutes with bilinear upsampling (both are linear, and the interpolation
        weights sum to 1), so each part is projected to the classes at its own resolution and
        only ``num_classes`` channels are upsampled: the same logits (within float rounding) for a
        fraction of the stride-4 work and memory. The predictor's weights are unchanged.
        """
        weights = self.predictor.weight.split(self.convs_dim, dim=1)
        logits = F.conv2d(f4, weights[3], self.predictor.bias)
        for x, weight in zip((dpc32, dpc16, f8), weights[:3]):
            part = F.interpolate(F.conv2d(x, weight), size=f4.shape[-2:], mode="bilinear")
            logits = add_into(logits, part)
        return logits

    def forward(self, features, targets=None, image_sizes=None):
        logits = self.layers(features)
        if self.training:
            return None, self.losses(logits, targets, image_sizes)
        return self.upsample(logits), {}

    def losses(self, predictions, targets, image_sizes=None):
        """Training loss {"loss_sem_seg"} of ``layers``' stride-4 logits against (N, H, W) targets
        at the padded input size: the hard-pixel cross-entropy, times ``loss_weight``.
        ``image_sizes``: (h, w) of each image before padding, for the "image" normalisation."""
        if targets is None:
            raise ValueError("EfficientPSSemSegHead needs semantic targets in training.")
        logits = self.upsample(predictions)
        if targets.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"Semantic targets of size {tuple(targets.shape[-2:])} do not match the padded "
                f"input size {tuple(logits.shape[-2:])}."
            )
        loss = hard_pixel_cross_entropy(
            logits,
            targets,
            ignore_value=self.ignore_value,
            hard_pixel_fraction=self.hard_pixel_fraction,
            normalization=self.hard_pixel_normalization,
            image_sizes=image_sizes,
        )
        return {"loss_sem_seg": loss * self.loss_weight}

    def upsample(self, logits):
        """``layers``' stride-4 logits -> logits at the padded input size (bilinear)."""
        return F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear")
