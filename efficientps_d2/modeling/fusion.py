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

All detections are pasted at once (one ``grid_sample`` per chunk of boxes, padded to the chunk's
largest box), so the per-instance work is a few tensor ops on the instance's box crop, with no
host-device round trip: the overlap decisions stay on the device until the end. Memory stays at a
few H x W maps plus one chunk of padded crops (bounded by ``_CHUNK_ELEMENTS``), however many
instances there are. The result equals visiting the instances one by one (the reference
behaviour, kept in ``tests/test_fast_paths.py``).
"""

from typing import Dict, List, Sequence, Tuple, Union

import torch
from detectron2.structures import Instances
from torch.nn import functional as F

__all__ = ["panoptic_fusion"]

_REQUIRED_FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_mask_logits")


# Most padded crop elements (instances x rows x cols) pasted at once; bounds the fusion's memory.
_CHUNK_ELEMENTS = 1 << 22


def _box_pixel_ranges(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """
    Pixels [start, end) whose centres (i + 0.5) fall inside each box, clipped to the image.

    Args:
        boxes: [K, 4] finite (x0, y0, x1, y1).
    Returns:
        [K, 4] long (row_start, row_end, col_start, col_end).
    """
    # In float64, like Python's math.ceil on the float32 coordinates: exact.
    b = boxes.double()
    rows = torch.ceil(b[:, 1::2] - 0.5).clamp(0, height)
    cols = torch.ceil(b[:, 0::2] - 0.5).clamp(0, width)
    return torch.cat([rows, cols], dim=1).long()


def _paste_mask_logits_batched(
    mask_logits: torch.Tensor, boxes: torch.Tensor, origins: torch.Tensor, size: Tuple[int, int]
) -> torch.Tensor:
    """
    Bilinearly sample K masks onto pixel crops of their boxes, all padded to one size.

    Args:
        mask_logits: [K, 1, M, M] float logits.
        boxes: [K, 4] float32 (x0, y0, x1, y1) in image pixels, with x1 > x0 and y1 > y0.
        origins: [K, 2] long (first row, first column) of each crop.
        size: (h, w) of the padded crops; entries past an instance's own crop are meaningless.

    Returns:
        [K, h, w] logits; element (k, i, j) is pixel (origins[k, 0] + i, origins[k, 1] + j).
    """
    device = mask_logits.device
    num = mask_logits.shape[0]
    h, w = size
    boxes64 = boxes.double()
    # Same mapping as Detectron2's paste_masks_in_image: pixel centres, normalised so that the box
    # edges land on the mask's outer edges (align_corners=False). Every op matches, bit for bit,
    # the one-box-at-a-time computation (box extents rounded from float64, as Python floats are).
    rows = (origins[:, :1] + torch.arange(h, device=device)).float()
    cols = (origins[:, 1:] + torch.arange(w, device=device)).float()
    extent = (boxes64[:, 2:] - boxes64[:, :2]).float()  # (width, height)
    ys = (rows + 0.5 - boxes[:, 1:2]) / extent[:, 1:] * 2 - 1
    xs = (cols + 0.5 - boxes[:, 0:1]) / extent[:, :1] * 2 - 1
    grid = torch.stack([xs[:, None, :].expand(num, h, w), ys[:, :, None].expand(num, h, w)], -1)
    # Border padding, not zero padding: a zero logit means p = 0.5, not background, so padding with
    # it would smear an undecided rim along the box edge. Outside the box nothing is sampled.
    return F.grid_sample(mask_logits, grid, align_corners=False, padding_mode="border")[:, 0]


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
    device = mask_logits.device
    boxes = torch.tensor([list(box)], dtype=torch.float32, device=device)
    origins = torch.tensor([[rows[0], cols[0]]], device=device)
    size = (rows[1] - rows[0], cols[1] - cols[0])
    return _paste_mask_logits_batched(mask_logits, boxes, origins, size)[0]


def _class_max(sem: torch.Tensor, class_ids: List[int]) -> torch.Tensor:
    """Max over the given classes of [C, H, W] logits, reading contiguous runs as slices."""
    best = None
    start = 0
    for i in range(1, len(class_ids) + 1):
        if i < len(class_ids) and class_ids[i] == class_ids[i - 1] + 1:
            continue
        run = sem[class_ids[start] : class_ids[i - 1] + 1].amax(dim=0)
        best = run if best is None else torch.maximum(best, run)
        start = i
    return best


def _chunks(sizes: List[Tuple[int, int]]) -> List[Tuple[int, int, int, int]]:
    """Consecutive (start, end, h, w) groups of crops, padded to (h, w), with at most
    _CHUNK_ELEMENTS padded elements and at most about half of them padding."""
    chunks = []
    start, h, w, area = 0, 0, 0, 0
    for i, (hi, wi) in enumerate(sizes):
        nh, nw, narea = max(h, hi), max(w, wi), area + hi * wi
        padded = (i + 1 - start) * nh * nw
        if i > start and (padded > _CHUNK_ELEMENTS or padded > 2 * narea + (1 << 16)):
            chunks.append((start, i, h, w))
            start, nh, nw, narea = i, hi, wi, hi * wi
        h, w, area = nh, nw, narea
    if start < len(sizes):
        chunks.append((start, len(sizes), h, w))
    return chunks


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
    thing_id_list = thing_ids.tolist()
    stuff_id_list = [c for c in range(num_classes) if c not in set(thing_id_list)]

    # Index 0 of best_idx stands for "stuff"; candidate j (in score order) is index j + 1. Strict
    # ">" updates in score order reproduce argmax's first-maximum tie-breaking over
    # [stuff ; FL_1 ... FL_n].
    if stuff_id_list:
        best_val = _class_max(sem, stuff_id_list)
    else:
        best_val = torch.full((height, width), float("-inf"), device=device)
    best_idx = torch.zeros((height, width), dtype=torch.int32, device=device)
    claimed = torch.zeros((height, width), dtype=torch.bool, device=device)

    candidates, kept = _fuse_instances(
        sem,
        instances,
        thing_ids,
        best_val,
        best_idx,
        claimed,
        confidence_thresh=confidence_thresh,
        overlap_thresh=overlap_thresh,
        mask_logit_scale=mask_logit_scale,
    )
    class_list: List[int] = []
    score_list: List[float] = []
    if candidates:
        class_list = instances.pred_classes.tolist()
        score_list = instances.scores.float().tolist()

    # One code per pixel: its semantic argmax class c (0..C-1) where stuff won step 5, C + j where
    # candidate j did. One bincount gives every area, one lookup the segment ids.
    # (max(dim).indices is argmax, first maximum included, but several times faster on CPU.)
    sem_argmax = sem.max(dim=0).indices.to(best_idx.dtype)
    code = torch.where(best_idx == 0, sem_argmax, best_idx + (num_classes - 1))
    areas = torch.bincount(code.flatten(), minlength=num_classes + len(candidates)).tolist()
    stuff_areas, thing_areas = areas[:num_classes], areas[num_classes:]

    segments_info: List[Dict] = []
    lut = [0] * (num_classes + len(candidates))  # code -> segment id (0: void)
    for j, (det, is_kept) in enumerate(zip(candidates, kept)):
        if not is_kept or thing_areas[j] == 0:
            continue
        seg_id = len(segments_info) + 1
        lut[num_classes + j] = seg_id
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
    for cls in stuff_id_list:  # thing classes stay void where stuff won
        if stuff_areas[cls] == 0 or stuff_areas[cls] < stuff_area_limit:
            continue
        seg_id = len(segments_info) + 1
        lut[cls] = seg_id
        segments_info.append(
            {"id": seg_id, "isthing": False, "category_id": cls, "area": stuff_areas[cls]}
        )
    panoptic_seg = torch.tensor(lut, dtype=torch.int32, device=device)[code]
    return panoptic_seg, segments_info


def _fuse_instances(
    sem: torch.Tensor,
    instances: Instances,
    thing_ids: torch.Tensor,
    best_val: torch.Tensor,
    best_idx: torch.Tensor,
    claimed: torch.Tensor,
    *,
    confidence_thresh: float,
    overlap_thresh: float,
    mask_logit_scale: float,
) -> Tuple[List[int], List[bool]]:
    """
    Steps 1-5 of the fusion for all detections; updates best_val, best_idx and claimed in place.

    Returns:
        candidates: indices into ``instances`` of the detections that reach the overlap filter
            (score >= confidence_thresh, a box covering some pixel centre), by score; candidate
            j is index j + 1 in ``best_idx``.
        kept: for each candidate, whether it passed the overlap filter.
    """
    if not instances.get_fields() or len(instances) == 0:
        return [], []
    device = sem.device
    height, width = sem.shape[-2:]
    scores = instances.scores.to(device).float()
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[scores[order] >= confidence_thresh]
    boxes = instances.pred_boxes.tensor.to(device).float()[order]
    valid = torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] > boxes[:, 0])
    valid &= boxes[:, 3] > boxes[:, 1]
    boxes = torch.where(valid[:, None], boxes, torch.zeros_like(boxes))
    ranges = _box_pixel_ranges(boxes, height, width)
    valid &= (ranges[:, 0] < ranges[:, 1]) & (ranges[:, 2] < ranges[:, 3])
    # The only host round trip before the end: the candidates and their crops, as Python ints.
    order, boxes, ranges = order[valid], boxes[valid], ranges[valid]
    candidates = order.tolist()
    if not candidates:
        return [], []
    crops = ranges.tolist()

    masks = instances.pred_mask_logits.to(device).float()[order]
    sem_ids = thing_ids[instances.pred_classes.to(device)[order]]
    keeps = []
    sizes = [(r1 - r0, c1 - c0) for r0, r1, c0, c1 in crops]
    for start, end, h, w in _chunks(sizes):
        origins = ranges[start:end][:, [0, 2]]
        mla = _paste_mask_logits_batched(masks[start:end], boxes[start:end], origins, (h, w))
        mla = mla * mask_logit_scale
        # MLB: the semantic logit of each instance's class on its crop (the padding reads clamped
        # pixels and is never used).
        rows = (origins[:, :1] + torch.arange(h, device=device)).clamp_(max=height - 1)
        cols = (origins[:, 1:] + torch.arange(w, device=device)).clamp_(max=width - 1)
        mlb = sem[sem_ids[start:end, None, None], rows[:, :, None], cols[:, None, :]]
        fused = (mla.sigmoid() + mlb.sigmoid()) * (mla + mlb)
        extents = ranges[start:end, 1::2] - ranges[start:end, 0::2]  # (h, w) of each crop
        rows_in = torch.arange(h, device=device) < extents[:, :1]
        cols_in = torch.arange(w, device=device) < extents[:, 1:]
        binary = (mla > 0) & rows_in[:, :, None] & cols_in[:, None, :]  # sigmoid(mla) > 0.5
        areas = binary.sum(dim=(1, 2))
        # float64, as the Python arithmetic of the one-at-a-time definition.
        limits = areas.double() * overlap_thresh
        for k in range(end - start):
            r0, r1, c0, c1 = crops[start + k]
            crop = (slice(r0, r1), slice(c0, c1))
            mask = binary[k, : r1 - r0, : c1 - c0]
            region_claimed = claimed[crop]
            keep = (areas[k] > 0) & ((mask & region_claimed).sum() <= limits[k])
            region_claimed |= mask & keep
            keeps.append(keep)

            region_val = best_val[crop]
            fl = fused[k, : r1 - r0, : c1 - c0]
            wins = (fl > region_val) & keep
            region_val.copy_(torch.where(wins, fl, region_val))
            best_idx[crop].masked_fill_(wins, start + k + 1)
    kept = torch.stack(keeps).tolist()
    return candidates, kept
