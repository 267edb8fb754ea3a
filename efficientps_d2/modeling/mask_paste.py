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
image, every pixel of it is sampled with Detectron2's float32 arithmetic, thresholded, and
scattered into its own mask in one call per chunk. So the masks equal Detectron2's, with one
device read per image (the crop sizes). On the CPU it takes about the time Detectron2's loop
takes (both are dominated by zeroing the (N, H, W) output); the point is the GPU.
"""

import torch
from detectron2.layers import paste_masks_in_image
from torch.nn import functional as F

from .crop_chunks import chunk_crops

__all__ = ["paste_masks"]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape, threshold: float = 0.5):
    """Detectron2's ``paste_masks_in_image(masks, boxes, image_shape, threshold)``.

    Args:
        masks: (N, M, M) probabilities; boxes: (N, 4) XYXY in image pixels (a tensor);
        image_shape: (height, width); threshold: binarises the pasted probabilities.

    Returns:
        (N, height, width) bool masks (uint8 for a negative threshold, as Detectron2's).
    """
    height, width = (int(s) for s in image_shape)
    if threshold < 0.5 or len(masks) == 0:
        # Below 0.5 a pixel outside its box can pass (Detectron2's GPU and CPU paths differ).
        return paste_masks_in_image(masks, boxes, (height, width), threshold)
    num, device = len(masks), masks.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    # Detectron2's CPU crop of each box: [floor(x0) - 1, ceil(x1) + 1) clipped to the image; empty
    # for a box that is not finite (its samples are NaN, never above the threshold).
    safe = torch.where(torch.isfinite(boxes).all(dim=1, keepdim=True), boxes, 0.0)
    x0, y0 = ((safe[:, i].floor() - 1).clamp(min=0) for i in (0, 1))
    x1, y1 = ((safe[:, i].ceil() + 1).clamp(max=limit) for i, limit in ((2, width), (3, height)))
    crops = torch.stack([x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)], dim=1).long()
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in crops.tolist()]  # the one read

    # Every pixel lands in its own mask's plane: flat index (k * height + row) * width + col.
    out = torch.zeros(num * height * width, dtype=torch.bool, device=device)
    masks = masks[:, None].float()
    # Where a kernel launch is cheap (CPU), little padding; on CUDA, few launches.
    for first, last, h, w in chunk_crops(sizes, compact=device.type != "cuda"):
        if h == 0 or w == 0:  # boxes off the image: nothing to paste
            continue
        # Each crop grown to (h, w) but kept inside the image, so that it still covers its crop.
        top = crops[first:last, 1:2].clamp(max=height - h)
        left = crops[first:last, 0:1].clamp(max=width - w)
        rows = top + torch.arange(h, device=device)
        cols = left + torch.arange(w, device=device)
        x0, y0, x1, y1 = boxes[first:last].split(1, dim=1)
        # Detectron2's mapping (_do_paste_mask), op for op: pixel centres to [-1, 1] on the box.
        grid_y = (rows.float() + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid_x = (cols.float() + 0.5 - x0) / (x1 - x0) * 2 - 1
        count = last - first
        grid = torch.stack(
            [grid_x[:, None, :].expand(count, h, w), grid_y[:, :, None].expand(count, h, w)], dim=3
        )
        pasted = F.grid_sample(masks[first:last], grid, align_corners=False)[:, 0] >= threshold
        plane = torch.arange(first, last, device=device)[:, None, None] * height
        index = (plane + rows[:, :, None]) * width + cols[:, None, :]
        out.scatter_(0, index.flatten(), pasted.flatten())
    return out.view(num, height, width)
