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
:func:`detector_postprocess` is Detectron2's with these masks: what EfficientPS's and the exported
models' outputs go through.
"""

import torch
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.postprocessing import detector_postprocess as d2_detector_postprocess
from detectron2.structures import BitMasks, Instances, ROIMasks
from torch.nn import functional as F

from .crop_chunks import chunk_crops

__all__ = ["detector_postprocess", "paste_masks"]

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
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"Only square masks can be pasted, got {tuple(masks.shape)}.")
    num, device = len(masks), boxes.device
    masks = masks.to(device)[:, None]
    masks = masks if masks.dtype.is_floating_point else masks.float()
    # Detectron2's CPU crop of each box: [floor(x0) - 1, ceil(x1) + 1) clipped to the image; empty
    # for a box that is not finite or not ordered (its samples never pass the threshold).
    safe = torch.where(torch.isfinite(boxes).all(dim=1, keepdim=True), boxes, 0.0)
    x0, y0 = ((safe[:, i].floor() - 1).clamp(min=0) for i in (0, 1))
    x1, y1 = ((safe[:, i].ceil() + 1).clamp(max=limit) for i, limit in ((2, width), (3, height)))
    crops = torch.stack([x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)], dim=1).long()
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in crops.tolist()]  # the one read

    # Every pixel lands in its own mask's plane: flat index (k * height + row) * width + col.
    out = torch.zeros(num * height * width, dtype=torch.bool, device=device)
    # Where a kernel launch is cheap (CPU), little padding; on CUDA, few launches.
    for first, last, h, w in chunk_crops(sizes, compact=device.type != "cuda"):
        if h == 0 or w == 0:  # boxes off the image: nothing to paste
            continue
        # Each crop grown to (h, w) but kept inside the image, so that it still covers its crop.
        crop = crops[first:last]
        rows = crop[:, 1:2].clamp(max=height - h) + torch.arange(h, device=device)
        cols = crop[:, 0:1].clamp(max=width - w) + torch.arange(w, device=device)
        bx0, by0, bx1, by1 = boxes[first:last].split(1, dim=1)
        # Detectron2's mapping (_do_paste_mask), op for op and in its dtypes: pixel centres (a
        # float32 range) to [-1, 1] on the box, then sampled in the masks' dtype.
        grid_y = (rows.float() + 0.5 - by0) / (by1 - by0) * 2 - 1
        grid_x = (cols.float() + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
        count = last - first
        grid = torch.stack(
            [grid_x[:, None, :].expand(count, h, w), grid_y[:, :, None].expand(count, h, w)], dim=3
        )
        sampled = F.grid_sample(masks[first:last], grid.to(masks.dtype), align_corners=False)
        # Outside its crop a float32 sample cannot pass 0.5, but a coarser grid (half-precision
        # masks) or a box far off the image could: the crop bounds it, as Detectron2's CPU path.
        inside_rows = (rows >= crop[:, 1:2]) & (rows < crop[:, 3:4])
        inside_cols = (cols >= crop[:, 0:1]) & (cols < crop[:, 2:3])
        pasted = (sampled[:, 0] >= threshold) & inside_rows[:, :, None] & inside_cols[:, None, :]
        plane = torch.arange(first, last, device=device)[:, None, None] * height
        index = (plane + rows[:, :, None]) * width + cols[:, None, :]
        out.scatter_(0, index.flatten(), pasted.flatten())
    return out.view(num, height, width)


def detector_postprocess(detections: Instances, height: int, width: int) -> Instances:
    """Detectron2's ``detector_postprocess`` (boxes scaled to (height, width), clipped, empty ones
    dropped, masks pasted), with the masks pasted by :func:`paste_masks`: the same output (and,
    as Detectron2's, the caller's boxes scaled in place), without Detectron2's full-image pasting
    on a GPU."""
    fields = detections.get_fields()
    if "pred_masks" not in fields:
        return d2_detector_postprocess(detections, height, width)
    if _UNPASTED in fields:
        raise ValueError(f"Instances with a field named {_UNPASTED!r} cannot be postprocessed.")
    # Under another name the M x M probabilities are scaled and filtered with the boxes, unpasted.
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
