"""EfficientPS's changes to Mask R-CNN: separable convs with norm + LeakyReLU in the RPN head and
the mask head. Everything else (anchors, matching, ROI heads, losses) is Detectron2's own.
"""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ConvTranspose2d, ShapeSpec, cat
from detectron2.modeling import ROI_MASK_HEAD_REGISTRY, RPN_HEAD_REGISTRY
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from detectron2.structures import Instances
from torch import nn

from .layers import SeparableConv2d, leaky_relu


@RPN_HEAD_REGISTRY.register()
class SeparableConvRPNHead(StandardRPNHead):
    """Detectron2's RPN head with its 3x3 conv made separable, with norm + LeakyReLU
    (MODEL.RPN.HEAD_NAME: "SeparableConvRPNHead"; the norm is MODEL.RPN.HEAD_NORM).

    Same inputs, outputs and ``forward`` as ``StandardRPNHead``; only the hidden conv differs.
    """

    @configurable
    def __init__(self, *, in_channels, num_anchors, box_dim=4, conv_dims=(-1,), norm="BN"):
        # StandardRPNHead.__init__ assumes biased convs everywhere, so its layers are built here.
        nn.Module.__init__(self)
        convs = []
        for dim in conv_dims:
            out_channels = in_channels if dim == -1 else dim
            if out_channels <= 0:
                raise ValueError(f"MODEL.RPN.CONV_DIMS must be positive or -1, got {conv_dims}.")
            convs.append(SeparableConv2d(in_channels, out_channels, norm=norm))
            in_channels = out_channels
        self.conv = convs[0] if len(convs) == 1 else nn.Sequential(*convs)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)
        for layer in (self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        kwargs = super().from_config(cfg, input_shape)
        kwargs["norm"] = cfg.MODEL.RPN.HEAD_NORM
        return kwargs


@ROI_MASK_HEAD_REGISTRY.register()
class SeparableConvMaskHead(BaseMaskRCNNHead, nn.Sequential):
    """Mask head of separable 3x3 convs, a 2x deconv and a 1x1 predictor
    (MODEL.ROI_MASK_HEAD.NAME: "SeparableConvMaskHead").

    In inference, besides Detectron2's ``pred_masks`` (probabilities), each instance gets
    ``pred_mask_logits`` (K, 1, M, M): the raw logits of its predicted class, which EfficientPS's
    panoptic fusion pastes and fuses.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes, conv_dims, conv_norm="BN", **kwargs):
        super().__init__(**kwargs)
        if len(conv_dims) < 2:
            raise ValueError("MODEL.ROI_MASK_HEAD.NUM_CONV must be at least 1.")
        channels = input_shape.channels
        for k, dim in enumerate(conv_dims[:-1]):
            self.add_module(f"mask_fcn{k + 1}", SeparableConv2d(channels, dim, norm=conv_norm))
            channels = dim
        self.deconv = ConvTranspose2d(channels, conv_dims[-1], kernel_size=2, stride=2)
        self.deconv_act = leaky_relu()
        self.predictor = nn.Conv2d(conv_dims[-1], num_classes, kernel_size=1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="leaky_relu")
        nn.init.zeros_(self.deconv.bias)
        # Small predictor weights, as Detectron2 does, so early masks start near probability 0.5.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_MASK_HEAD
        kwargs = super().from_config(cfg, input_shape)
        kwargs.update(
            input_shape=input_shape,
            conv_dims=[head.CONV_DIM] * (head.NUM_CONV + 1),  # +1 for the deconv
            conv_norm=head.NORM,
            num_classes=1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        )
        return kwargs

    def layers(self, x):
        for layer in self:
            x = layer(x)
        return x

    def forward(self, x, instances: List[Instances]):
        if self.training:
            return super().forward(x, instances)
        return self.label_instances(self.layers(x), instances)

    def label_instances(self, logits: torch.Tensor, instances: List[Instances]) -> List[Instances]:
        """Inference's second half: sets each instance's ``pred_masks`` and ``pred_mask_logits``
        from the ``layers`` outputs (R, num_classes, M, M) of all of ``instances``' boxes, in
        order. (Apart, so that a CUDA graph of ``layers`` can be labelled the same way.)"""
        if logits.shape[1] > 1:
            classes = cat([i.pred_classes for i in instances])
            logits = logits[torch.arange(len(classes), device=logits.device), classes][:, None]
        # Detectron2's mask_rcnn_inference sets pred_masks to the sigmoid of the same logits: done
        # here from the ones picked once (it would pick them again: five more operator calls).
        probs = logits.sigmoid()
        sizes = [len(i) for i in instances]
        per_image = zip(logits.split(sizes), probs.split(sizes))
        for inst, (image_logits, image_probs) in zip(instances, per_image):
            inst.pred_masks = image_probs  # first, as mask_rcnn_inference set it
            inst.pred_mask_logits = image_logits
        return instances
