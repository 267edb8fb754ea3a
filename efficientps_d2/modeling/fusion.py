"""EfficientPS panoptic fusion: semantic-head logits + Mask R-CNN outputs -> one panoptic map.

The fusion is parameter-free and works on logits throughout:

1. Detections scoring at least ``confidence_thresh`` are visited by score, descending.
2. Each one's M x M mask logits are pasted bilinearly onto its box (Detectron2's pasting
   convention) and scaled by ``mask_logit_scale``; the instance does not exist outside its box.
3. An instance whose binary mask (sigmoid > 0.5) is empty, or is more than ``overlap_thresh``
   claimed by higher-scored kept instances, is dropped; otherwise it claims its mask pixels.
4. Each kept instance gets fused logits ``FL = (sigmoid(A) + sigmoid(B)) * (A + B)`` inside its box,
   with A its pasted mask logits and B the semantic logit of its class.
5. Every pixel goes to the argmax of [stuff-class semantic logits ; FL_1 ... FL_n].
6. Stuff pixels take the semantic argmax over all classes; where that is a thing class they are
   void, and so are stuff segments smaller than ``stuff_area_limit``. Instances that win no pixel
   produce no segment.

Memory stays at a few H x W maps however many instances there are: each instance is handled on its
box crop against a running best-logit / best-index map, which is equivalent to the argmax of step 5.
"""

import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
from detectron2.structures import Instances
from torch.nn import functional as F

__all__ = ["panoptic_fusion"]

_REQUIRED_FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_mask_logits")


def _box_pixel_range(lo: float, hi: float, size: int) -> Tuple[int, int]:
    """Pixels [start, end) whose centres (i + 0.5) fall inside [lo, hi), clipped to [0, size)."""
    start = min(max(math.ceil(lo - 0.5), 0), size)
    end = min(max(math.ceil(hi - 0.5), 0), size)
    return start, end


def _paste_mask_logits(
    mask_logits: torch.Tensor, box: Sequence[float], rows: Tuple[int, int], cols: Tuple[int, int]
) -> torch.Tensor:
    """
    Bilinearly sample one mask onto the pixel crop ``rows x cols`` of its box.

    Args:
        mask_logits: [1, 1, M, M] float logits.
        box: (x0, y0, x1, y1) in image pixels, with x1 > x0 and y1 > y0.
        rows, cols: [start, end) pixel ranges of the crop.

    Returns:
        [h, w] logits for the crop.
    """
    x0, y0, x1, y1 = box
    device = mask_logits.device
    # Same mapping as Detectron2's paste_masks_in_image: pixel centres, normalised so that the box
    # edges land on the mask's outer edges (align_corners=False).
    ys = (torch.arange(*rows, device=device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    xs = (torch.arange(*cols, device=device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    # Border padding, not zero padding: a zero logit means p = 0.5, not background, so padding with
    # it would smear an undecided rim along the box edge. Outside the box nothing is sampled.
    pasted = F.grid_sample(mask_logits, grid, align_corners=False, padding_mode="border")
    return pasted[0, 0]


def _validate(
    sem_seg_logits: torch.Tensor,
    instances: Instances,
    thing_ids: torch.Tensor,
    mask_logit_scale: float,
) -> None:
    if not isinstance(sem_seg_logits, torch.Tensor) or sem_seg_logits.dim() != 3:
        shape = tuple(sem_seg_logits.shape) if isinstance(sem_seg_logits, torch.Tensor) else None
        raise ValueError(f"sem_seg_logits must be a 3-D [C, H, W] tensor, got shape {shape}")
    if not sem_seg_logits.is_floating_point():
        raise ValueError(f"sem_seg_logits must be floating point, got {sem_seg_logits.dtype}")
    num_classes, height, width = sem_seg_logits.shape
    image_size = tuple(int(s) for s in instances.image_size)
    if image_size != (height, width):
        raise ValueError(
            f"instances.image_size {image_size} must equal sem_seg_logits' (H, W) {(height, width)}"
        )
    if thing_ids.dim() != 1:
        raise ValueError(f"thing_semantic_ids must be 1-D, got shape {tuple(thing_ids.shape)}")
    if thing_ids.numel() and (thing_ids.min() < 0 or thing_ids.max() >= num_classes):
        raise ValueError(
            f"thing_semantic_ids must lie in [0, {num_classes}) (C = sem_seg_logits.shape[0]), "
            f"got {thing_ids.tolist()}"
        )
    if thing_ids.unique().numel() != thing_ids.numel():
        raise ValueError(f"thing_semantic_ids must not repeat a class, got {thing_ids.tolist()}")
    if not mask_logit_scale > 0:
        raise ValueError(f"mask_logit_scale must be positive, got {mask_logit_scale}")

    if not instances.get_fields():
        return  # an Instances with no fields at all is read as zero detections
    missing = [name for name in _REQUIRED_FIELDS if not instances.has(name)]
    if missing:
        raise ValueError(f"instances lacks the fields {missing}; it needs {list(_REQUIRED_FIELDS)}")
    num_det = len(instances)
    masks = instances.pred_mask_logits
    if masks.dim() != 4 or masks.shape[0] != num_det or masks.shape[1] != 1:
        raise ValueError(
            f"instances.pred_mask_logits must be [K, 1, M, M] with K = {num_det}, "
            f"got {tuple(masks.shape)}"
        )
    if masks.shape[2] != masks.shape[3]:
        raise ValueError(
            f"instances.pred_mask_logits must hold square M x M masks, got {tuple(masks.shape)}"
        )
    classes = instances.pred_classes
    if num_det and (classes.min() < 0 or classes.max() >= thing_ids.numel()):
        raise ValueError(
            f"instances.pred_classes must be contiguous thing ids in [0, {thing_ids.numel()}) "
            f"(T = len(thing_semantic_ids)), got {classes.tolist()}"
        )


@torch.no_grad()
def panoptic_fusion(
    sem_seg_logits: torch.Tensor,
    instances: Instances,
    *,
    thing_semantic_ids: Union[Sequence[int], torch.Tensor],
    confidence_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    stuff_area_limit: int = 2048,
    mask_logit_scale: float = 4.0,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Fuse semantic and instance predictions of one image (ARCHITECTURE.md section 5).

    Args:
        sem_seg_logits: float [C, H, W] semantic logits over all classes, at output resolution.
        instances: detections of the same image, ``image_size == (H, W)``, with fields
            ``pred_boxes`` (Boxes, XYXY in H x W pixels), ``scores`` [K], ``pred_classes`` [K]
            (contiguous thing ids 0..T-1) and ``pred_mask_logits`` [K, 1, M, M] (raw logits of the
            predicted class).
        thing_semantic_ids: [T] semantic class index (0..C-1) of each thing class; the other
            classes are stuff.
        confidence_thresh: detections scoring below this are ignored.
        overlap_thresh: an instance is dropped if more than this fraction of its binary mask is
            already claimed by higher-scored instances.
        stuff_area_limit: stuff segments with fewer pixels become void.
        mask_logit_scale: factor applied to the pasted mask logits.

    Returns:
        panoptic_seg: int32 [H, W] on sem_seg_logits' device; 0 is void, segments are 1..S.
        segments_info: one dict per segment, things first (by score) then stuff (by class):
            things ``{"id", "isthing": True, "category_id" (thing id), "score", "instance_id"
            (index into ``instances``), "area"}``; stuff ``{"id", "isthing": False,
            "category_id" (semantic class index), "area"}``.
    """
    if isinstance(sem_seg_logits, torch.Tensor):
        device = sem_seg_logits.device
    else:
        device = torch.device("cpu")
    thing_ids = torch.as_tensor(thing_semantic_ids, dtype=torch.long, device=device)
    _validate(sem_seg_logits, instances, thing_ids, mask_logit_scale)

    sem = sem_seg_logits.float()
    num_classes, height, width = sem.shape
    is_thing_class = torch.zeros(num_classes, dtype=torch.bool, device=device)
    is_thing_class[thing_ids] = True
    stuff_ids = (~is_thing_class).nonzero().flatten()

    # Index 0 of best_idx stands for "stuff"; kept instance j is index j + 1. Strict ">" updates in
    # score order reproduce argmax's first-maximum tie-breaking over [stuff ; FL_1 ... FL_n].
    if stuff_ids.numel():
        best_val = sem[stuff_ids].max(dim=0).values
    else:
        best_val = torch.full((height, width), float("-inf"), device=device)
    best_idx = torch.zeros((height, width), dtype=torch.long, device=device)
    claimed = torch.zeros((height, width), dtype=torch.bool, device=device)
    kept: List[int] = []  # indices into `instances`, in score order
    class_list: List[int] = []
    score_list: List[float] = []

    num_det = len(instances) if instances.get_fields() else 0
    if num_det:
        scores = instances.scores.to(device).float()
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[scores[order] >= confidence_thresh].tolist()
        boxes = instances.pred_boxes.tensor.float().tolist()
        classes = instances.pred_classes.to(device)
        sem_ids = thing_ids[classes].tolist()
        class_list, score_list = classes.tolist(), scores.tolist()
        masks = instances.pred_mask_logits.to(device).float()
        for det in order:
            box = boxes[det]
            if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
                continue  # degenerate box: an empty mask
            rows = _box_pixel_range(box[1], box[3], height)
            cols = _box_pixel_range(box[0], box[2], width)
            if rows[0] >= rows[1] or cols[0] >= cols[1]:
                continue  # the box covers no pixel centre of the image
            crop = (slice(*rows), slice(*cols))
            mla = _paste_mask_logits(masks[det].unsqueeze(0), box, rows, cols) * mask_logit_scale

            mask = mla > 0  # sigmoid(mla) > 0.5
            mask_area = int(mask.sum())
            if mask_area == 0:
                continue
            if int((mask & claimed[crop]).sum()) > overlap_thresh * mask_area:
                continue
            claimed[crop] |= mask
            kept.append(det)

            mlb = sem[sem_ids[det]][crop]
            fused = (mla.sigmoid() + mlb.sigmoid()) * (mla + mlb)
            wins = fused > best_val[crop]
            best_val[crop] = torch.where(wins, fused, best_val[crop])
            best_idx[crop] = torch.where(
                wins, torch.full_like(best_idx[crop], len(kept)), best_idx[crop]
            )

    thing_areas = torch.bincount(best_idx.flatten(), minlength=len(kept) + 1).tolist()
    sem_argmax = sem.argmax(dim=0)
    stuff_pixels = (best_idx == 0) & ~is_thing_class[sem_argmax]
    stuff_areas = torch.bincount(sem_argmax[stuff_pixels], minlength=num_classes).tolist()

    segments_info: List[Dict] = []
    thing_lut = [0] * (len(kept) + 1)  # best_idx -> segment id (0: stuff or a pixel-less instance)
    for j, det in enumerate(kept, start=1):
        if thing_areas[j] == 0:
            continue
        seg_id = len(segments_info) + 1
        thing_lut[j] = seg_id
        segments_info.append(
            {
                "id": seg_id,
                "isthing": True,
                "category_id": class_list[det],
                "score": score_list[det],
                "instance_id": det,
                "area": thing_areas[j],
            }
        )
    stuff_lut = [0] * num_classes
    for cls in stuff_ids.tolist():
        if stuff_areas[cls] == 0 or stuff_areas[cls] < stuff_area_limit:
            continue
        seg_id = len(segments_info) + 1
        stuff_lut[cls] = seg_id
        segments_info.append(
            {"id": seg_id, "isthing": False, "category_id": cls, "area": stuff_areas[cls]}
        )

    thing_lut = torch.tensor(thing_lut, dtype=torch.int32, device=device)
    stuff_lut = torch.tensor(stuff_lut, dtype=torch.int32, device=device)
    panoptic_seg = torch.where(stuff_pixels, stuff_lut[sem_argmax], thing_lut[best_idx])
    return panoptic_seg, segments_info
