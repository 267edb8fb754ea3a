"""The network of an EfficientPS model as one traceable module with plain-tensor inputs and outputs.

:class:`EfficientPSGraph` runs what :meth:`EfficientPS.inference` runs before the panoptic fusion
(normalisation, padding to the size divisibility, backbone + 2-way FPN, semantic head, RPN with its
NMS, box head with its NMS, mask head) on one image, and returns tensors only, so that
``torch.jit.trace`` and ``torch.onnx.export`` can record it. The fusion stays outside the graph:
:func:`efficientps_d2.export.runtime.postprocess` runs it with the same
:func:`~efficientps_d2.modeling.fusion.panoptic_fusion` as the eager model.
"""

from typing import Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

__all__ = ["EfficientPSGraph", "OUTPUT_NAMES"]

# The graph's outputs, in order (also the ONNX output names).
OUTPUT_NAMES = ("sem_seg_logits", "boxes", "scores", "classes", "mask_logits")


class EfficientPSGraph(nn.Module):
    """
    One image through an eval-mode :class:`~efficientps_d2.modeling.meta_arch.EfficientPS`.

    ``forward(image)``: ``image`` is a float32 (3, H, W) tensor in the model's INPUT.FORMAT, as
    Detectron2's ``read_image`` gives it (pixel values 0-255; "YUV-BT.601": Y 0-1), any H and W
    (no resizing: resize before, as Detectron2's predictor does).

    Returns, in the order of ``OUTPUT_NAMES``:
        sem_seg_logits: (C, H, W) semantic logits over all classes (padding cropped off);
        boxes: (K, 4) XYXY detections in input pixels, clipped to the image;
        scores: (K,) detection scores, descending within each class;
        classes: (K,) int64 contiguous thing ids 0..T-1;
        mask_logits: (K, 1, M, M) mask logits of each detection's predicted class.
    K may be 0.
    """

    def __init__(self, model):
        super().__init__()
        roi_heads = model.roi_heads
        for name in ("mask_pooler", "mask_head", "box_predictor"):
            if getattr(roi_heads, name, None) is None:
                raise NotImplementedError(
                    f"Exporting needs ROI heads with a {name} (MODEL.MASK_ON True and "
                    f"StandardROIHeads-like heads); MODEL.ROI_HEADS.NAME "
                    f"{type(roi_heads).__name__} has none."
                )
        if getattr(roi_heads, "keypoint_on", False):
            raise NotImplementedError("Exporting a model with a keypoint head is not supported.")
        predictor = getattr(roi_heads.mask_head, "predictor", None)
        if not isinstance(predictor, nn.Conv2d):
            raise NotImplementedError(
                f"Exporting needs a mask head with a conv 'predictor' (MODEL.ROI_MASK_HEAD.NAME "
                f"SeparableConvMaskHead or Detectron2's MaskRCNNConvUpsampleHead); "
                f"{type(roi_heads.mask_head).__name__} has none."
            )
        self.class_specific_masks = predictor.out_channels > 1
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.proposal_generator = model.proposal_generator
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), False)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        height, width = image.shape[-2:]
        x = (image - self.pixel_mean) / self.pixel_std
        images = ImageList.from_tensors(
            [x],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        features = self.backbone(images.tensor)
        sem_seg_logits, _ = self.sem_seg_head(features)
        proposals, _ = self.proposal_generator(images, features, None)
        detections = self.roi_heads._forward_box(features, proposals)[0]
        boxes = detections.pred_boxes.tensor
        classes = detections.pred_classes
        roi_heads = self.roi_heads
        pooled = roi_heads.mask_pooler(
            [features[f] for f in roi_heads.mask_in_features], [detections.pred_boxes]
        )
        mask_logits = roi_heads.mask_head.layers(pooled)
        if self.class_specific_masks:  # keep the predicted class's mask
            size = mask_logits.shape[-1]
            index = classes.view(-1, 1, 1, 1).expand(-1, 1, size, size)
            mask_logits = mask_logits.gather(1, index)
        return (
            sem_seg_logits[0, :, :height, :width],
            boxes,
            detections.scores,
            classes,
            mask_logits,
        )
