"""Instance masks pasted into the image as Detectron2's ``paste_masks_in_image`` pastes them, in
a few batched calls on crops around the boxes.

Detectron2 pastes on the CPU one mask at a time (some 60 operator calls per mask), and on a GPU
every mask over the whole image at once: for 100 masks at 1024x2048 a 1.6 GB sampling grid and
0.8 GB of probabilities, several GB of memory traffic for masks that cover a few percent of it.
A mask is sampled with zero padding, so a pixel whose centre lies outside its box gets less than
half the border probability: below a threshold of 0.5 however confident the mask. Only a crop
one pixel wider than the box on each side (Detectron2's own CPU crop) can reach it.

Here the crops go in chunks padded to the chunk's largest crop (as the panoptic fusion's do:
compact chunks on the CPU, the fewest on CUDA): each crop grows to the chunk's size inside the
image, is sampled with Detectron2's arithmetic in its dtypes, thresholded, cut back to its own
crop and scattered into its mask, one call per chunk. So the masks equal Detectron2's, with one
device read per image (the crop sizes). On the CPU it takes about the time Detectron2's loop
takes (both are dominated by zeroing the (N, H, W) output); the point is the GPU.
:func:`detector_postprocess` is Detectron2's with these masks, and one device read where
Detectron2's waits for the device once per field: what EfficientPS's and the exported models'
outputs go through.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.postprocessing import detector_postprocess as d2_detector_postprocess
from detectron2.structures import BitMasks, Boxes, Instances, ROIMasks
from torch.nn import functional as F

from .crop_chunks import chunk_crops, chunk_rows, columns, crop_pixels
from .fast_inference import clip_boxes_

__all__ = [
    "detector_postprocess",
    "detector_postprocess_and_read",
    "paste_masks",
    "sampling_grid",
    "upload_ints",
]

# Where detector_postprocess keeps the M x M mask probabilities while Detectron2's runs.
_UNPASTED = "pred_masks_unpasted"


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape, threshold: float = 0.5):
    """Detectron2's ``paste_masks_in_image(masks, boxes, image_shape, threshold)``.

    The masks equal those of its CPU path (one crop at a time) for every input that path takes
    (a box whose crop is empty gives an empty mask here, an error there), and those of its GPU
    path (the whole image) for float32 masks: outside a crop no float32 sample reaches 0.5.
    Thresholds below 0.5, where its two paths differ, and no masks at all go to Detectron2.

    Args:
        masks: (N, M, M) probabilities; boxes: (N, 4) XYXY in image pixels (a tensor), on the
            output's device; image_shape: (height, width); threshold: binarises the pasted
            probabilities.

    Returns:
        (N, height, width) bool masks (uint8 for a negative threshold or none, as Detectron2's).
    """
    height, width = (int(s) for s in image_shape)
    if threshold < 0.5 or len(masks) == 0:
        return paste_masks_in_image(masks, boxes, (height, width), threshold)
    _check_square(masks)
    crops = _crops(boxes, height, width)
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in crops.tolist()]  # the one read
    plane = height * width
    # Every pixel lands in its own mask's plane: flat index k * height * width + row * width + col.
    planes = torch.arange(0, len(masks) * plane, plane, device=boxes.device)[:, None]
    crops = columns(torch.cat([crops, planes], dim=1))
    return _paste(masks[:, None], boxes, crops, sizes, height, width, threshold)


def upload_ints(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``, without waiting for the device.

    ``torch.tensor(values, device="cuda")`` (or a list used as an index) copies with a blocking
    host-to-device copy, which synchronises the stream as a read does; a non-blocking copy from
    ordinary (pageable) memory is staged at once, so ``values`` may go away after the call.
    """
    return torch.tensor([int(v) for v in values], dtype=torch.long).to(device, non_blocking=True)


def sampling_grid(x0, y0, half_width, half_height, row_centres, col_centres) -> torch.Tensor:
    """``grid_sample``'s (K, h, w, 2) grid that maps the pixel centres of K crops onto [-1, 1]
    across each of K boxes: Detectron2's mapping in ``paste_masks_in_image`` (with
    ``align_corners=False`` the box edges land on the mask's outer edges). The boxes are given as
    (K, 1, 1) columns (their corner ``x0``, ``y0`` and half their width and height) and the pixel
    centres as (K, h, 1) ``row_centres`` and (K, 1, w) ``col_centres``: the batched callers keep
    every per-box number in that shape, so that it broadcasts without a reshaping call.
    Detectron2's "(c - x0) / (x1 - x0) * 2 - 1" is computed as "(c - x0) / half - 1": halving and
    doubling are exact, and rounding commutes with them."""
    ys = (row_centres - y0) / half_height - 1
    xs = (col_centres - x0) / half_width - 1
    return torch.stack(torch.broadcast_tensors(xs, ys), dim=3)


def _check_square(masks):
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"Only square masks can be pasted, got {tuple(masks.shape)}.")


def _crops(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Detectron2's CPU crop of each of the (N, 4) boxes: [floor(x0) - 1, ceil(x1) + 1) clipped to
    the image, as (N, 4) long (x0, y0, x1, y1); empty for a box that is not finite or not ordered
    (its samples never pass the threshold)."""
    safe = torch.where(torch.isfinite(boxes).all(dim=1, keepdim=True), boxes, 0.0)
    starts = (safe[:, :2].floor() - 1).clamp_(min=0)
    ends = safe[:, 2:].ceil() + 1
    ends[:, 0].clamp_(max=width)
    ends[:, 1].clamp_(max=height)
    return torch.cat([starts, torch.maximum(ends, starts)], dim=1).long()


def _paste(masks, boxes, crops, sizes, height, width, threshold):
    """:func:`paste_masks` of (N, 1, M, M) ``masks`` once their :func:`_crops` are known: on the
    device ``crops``, (N, 1, 1) columns (x0, y0, x1, y1, k * height * width: the offset of mask
    k's plane in the output), and on the host ``sizes`` ((height, width) of each)."""
    num, device = len(masks), boxes.device
    if num == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=device)
    if masks.device != device:
        masks = masks.to(device)
    masks = masks if masks.dtype.is_floating_point else masks.float()
    chunks = chunk_crops(sizes, compact=device.type != "cuda")
    # Every per-box number as an (N, 1, 1) column, so that it broadcasts over the crops.
    pixels = crop_pixels(chunks, device)
    box_x0, box_y0, box_x1, box_y1 = columns(boxes)
    # Half the (width, height), in the boxes' dtype.
    half_width, half_height = (box_x1 - box_x0) / 2, (box_y1 - box_y0) / 2
    per_box = (masks, box_x0, box_y0, half_width, half_height) + tuple(crops)
    out = torch.zeros(num * height * width, dtype=torch.bool, device=device)
    # Where a kernel launch is cheap (CPU), little padding; on CUDA, few launches.
    for (_, _, h, w), part in zip(chunks, chunk_rows(per_box, chunks)):
        if h == 0 or w == 0:  # boxes off the image: nothing to paste
            continue
        part_masks, x0, y0, half_w, half_h, crop_x0, crop_y0, crop_x1, crop_y1, planes = part

        # Each crop grown to (h, w) but kept inside the image, so that it still covers its crop.
        row0, col0 = crop_y0.clamp(max=height - h), crop_x0.clamp(max=width - w)
        rows, cols, row_centres, col_centres = pixels(row0, col0, h, w)
        # Detectron2's mapping (_do_paste_mask), value for value and in its dtypes: its pixel
        # centres (a float32 range i + 0.5) to [-1, 1] on the box, sampled in the masks' dtype.
        grid = sampling_grid(x0, y0, half_w, half_h, row_centres, col_centres)
        if grid.dtype != masks.dtype:
            grid = grid.to(masks.dtype)
        sampled = F.grid_sample(part_masks, grid, align_corners=False)
        # Outside its crop a float32 sample cannot pass 0.5, but a coarser grid (half-precision
        # masks) or a box far off the image could: the crop bounds it, as Detectron2's CPU path.
        inside_rows = (rows >= crop_y0) & (rows < crop_y1)
        inside_cols = (cols >= crop_x0) & (cols < crop_x1)
        pasted = (sampled[:, 0] >= threshold) & inside_rows & inside_cols
        index = (planes + rows * width) + cols
        # A scatter: on the CPU several times faster than index_put_ with the three indices.
        out.scatter_(0, index.flatten(), pasted.flatten())
    return out.view(num, height, width)


def detector_postprocess(detections: Instances, height: int, width: int) -> Instances:
    """Detectron2's ``detector_postprocess`` (boxes scaled to (height, width), clipped, empty ones
    dropped, masks pasted), with the masks pasted by :func:`paste_masks`: the same output (and,
    as Detectron2's, the caller's boxes scaled and clipped in place), without Detectron2's
    full-image pasting on a GPU.

    Where the detections have predicted boxes and masks (EfficientPS's), it reads the device
    once, where Detectron2's function waits for it once for its check of the boxes, once per
    field for dropping the empty boxes, and paste_masks once more: the check and the clipped
    boxes come back in one copy, the host works out which boxes to keep and their crops, and
    those go back in one upload that does not wait for the device. Where no box is dropped (the
    usual case), the output shares the input's tensors (scores, classes...) instead of copying
    them."""
    return detector_postprocess_and_read(detections, height, width)[0]


def detector_postprocess_and_read(
    detections: Instances, height: int, width: int, also_read: Sequence[torch.Tensor] = ()
) -> Tuple[Instances, Optional[Tuple[List[List[float]], List[float]]]]:
    """:func:`detector_postprocess`, and in its one read also the values of ``also_read`` ([N]
    tensors of the N detections, on their boxes' device), so that a caller that needs them on
    the host (the panoptic fusion) need not wait for the device again.

    Returns:
        The instances and, where the one-read path ran, (the kept detections' values of each of
        ``also_read``, their clipped XYXY boxes, flat) as Python numbers; else None (Detectron2's
        path: no detections, keypoints, sizes as tensors while tracing).
    """
    fields = detections.get_fields()
    if "pred_masks" not in fields:
        return d2_detector_postprocess(detections, height, width), None
    if _UNPASTED in fields:
        raise ValueError(f"Instances with a field named {_UNPASTED!r} cannot be postprocessed.")
    boxes = fields.get("pred_boxes")
    if (
        not isinstance(boxes, Boxes)
        or not len(boxes)
        or "pred_keypoints" in fields
        or not all(isinstance(s, int) for s in (height, width))
    ):
        return _detectron2_then_paste(detections, height, width), None
    masks = fields["pred_masks"]
    masks = masks.tensor[:, None] if isinstance(masks, ROIMasks) else masks  # (N, 1, M, M)
    _check_square(masks)

    # Detectron2's steps, value for value: scale (a no-op by 1.0 skipped), clip, keep non-empty.
    image_height, image_width = detections.image_size
    scale_x, scale_y = width / image_width, height / image_height
    if scale_x != 1.0 or scale_y != 1.0:
        boxes.scale(scale_x, scale_y)
    scaled = boxes.tensor
    clipped = scaled.clone()
    clip_boxes_(clipped, [(height, width)])
    num = len(boxes)
    # The one read: the clipped corners (float32, exact as Python floats), each box's finiteness
    # and what the caller asks for; which boxes are empty and their crops follow on the host.
    finite = torch.isfinite(scaled).all(dim=1)
    values = torch.cat([clipped.flatten(), finite, *also_read]).tolist()
    if not all(values[4 * num : 5 * num]):
        raise AssertionError("Box tensor contains infinite or NaN!")  # Detectron2's clip's
    boxes.tensor = clipped  # as Detectron2's clip does
    kept, crops = _kept_crops(values[: 4 * num], height, width)
    read = (
        [[values[start + i] for i in kept] for start in range(5 * num, len(values), num)],
        [v for i in kept for v in values[4 * i : 4 * i + 4]],
    )
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in zip(*[iter(crops)] * 4)]
    out = Instances((height, width), **fields)  # in the input's order of fields
    out.pred_boxes = Boxes(clipped)
    out.pred_masks = masks
    # The crops as columns (x0..., y0..., x1..., y1..., and the offsets of the masks' planes in
    # the output: see _paste), and the kept boxes' indices where a box is dropped, in one upload
    # that does not wait for the device (as a list used as an index would).
    planes = range(0, len(kept) * height * width, height * width)
    per_box = [*crops[0::4], *crops[1::4], *crops[2::4], *crops[3::4], *planes]
    if len(kept) == num:
        per_box = upload_ints(per_box, clipped.device)
    else:
        index, per_box = upload_ints(kept + per_box, clipped.device).split(
            [len(kept), len(per_box)]
        )
        out = out[index]
    crops = per_box.view(5, len(kept), 1, 1).unbind(0)
    out.pred_masks = _paste(
        out.pred_masks, out.pred_boxes.tensor, crops, sizes, height, width, threshold=0.5
    )
    return out, read


def _kept_crops(corners: List[float], height: int, width: int) -> Tuple[List[int], List[int]]:
    """The indices of the boxes that Detectron2's ``Boxes.nonempty`` keeps and their
    :func:`_crops`, flat, computed on the host from the clipped, finite XYXY ``corners`` of
    the boxes (flat): the same numbers, as Python's arithmetic on the float32 values is exact
    here (a difference of two floats is 0 only where they are equal; floor and ceil of numbers
    in [0, size] are exact in float32)."""
    kept, crops = [], []
    for i in range(len(corners) // 4):
        x0, y0, x1, y1 = corners[4 * i : 4 * i + 4]
        if x1 - x0 > 0 and y1 - y0 > 0:
            kept.append(i)
            col0, row0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
            col1, row1 = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
            crops += [col0, row0, max(col1, col0), max(row1, row0)]
    return kept, crops


def _detectron2_then_paste(detections: Instances, height: int, width: int) -> Instances:
    """:func:`detector_postprocess` through Detectron2's own, for what its one-read path does not
    take (no detections, proposal boxes, keypoints, sizes as tensors while tracing)."""
    # Under another name the M x M probabilities are scaled and filtered with the boxes, unpasted.
    fields = detections.get_fields()
    renamed = {(_UNPASTED if k == "pred_masks" else k): v for k, v in fields.items()}
    instances = d2_detector_postprocess(Instances(detections.image_size, **renamed), height, width)
    out = {}
    for name, value in instances.get_fields().items():  # in the input's order of fields
        if name == _UNPASTED:
            probs = value.tensor if isinstance(value, ROIMasks) else value[:, 0]
            pasted = paste_masks(probs, instances.pred_boxes.tensor, (height, width))
            name, value = "pred_masks", BitMasks(pasted).tensor  # bool, as Detectron2's
        out[name] = value
    return Instances(instances.image_size, **out)
