"""Box crops of different sizes grouped into chunks that one batched call handles, each chunk
padded to its largest crop: how the panoptic fusion and the mask pasting batch their work, and
the few tensor helpers they share to keep their operator calls per chunk down (on a GPU each call
costs host time: some 20-45 us where it launches a kernel, a few us for a view)."""

from typing import Callable, List, Sequence, Tuple

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "chunk_crops",
    "chunk_rows",
    "columns",
    "crop_pixels",
    "padded_elements",
    "prefix",
]

# Most padded crop elements (instances x rows x cols) in one chunk: bounds the memory of a call.
CHUNK_ELEMENTS = 1 << 22


def chunk_crops(sizes: List[Tuple[int, int]], compact: bool = True) -> List[Tuple[int, ...]]:
    """Consecutive (start, end, h, w) groups of the crops of ``sizes`` ((h, w) each), padded to
    (h, w), with at most CHUNK_ELEMENTS padded elements and, if ``compact``, at most about half
    of them padding.

    Compact chunks are the least work, for where a kernel launch is cheap (the CPU). Without
    ``compact`` the chunks are as large as the bound allows, so as few as can be: on a GPU a
    launch costs more than the padding does, and each chunk costs its own launches.
    """
    chunks = []
    start, h, w, area = 0, 0, 0, 0
    for i, (hi, wi) in enumerate(sizes):
        nh, nw, narea = max(h, hi), max(w, wi), area + hi * wi
        padded = (i + 1 - start) * nh * nw
        wasteful = compact and padded > 2 * narea + (1 << 16)
        if i > start and (padded > CHUNK_ELEMENTS or wasteful):
            chunks.append((start, i, h, w))
            start, nh, nw, narea = i, hi, wi, hi * wi
        h, w, area = nh, nw, narea
    if start < len(sizes):
        chunks.append((start, len(sizes), h, w))
    return chunks


def padded_elements(chunks: List[Tuple[int, ...]]) -> int:
    """Padded crop elements of all ``chunks``."""
    return sum((end - start) * h * w for start, end, h, w in chunks)


def chunk_rows(tensors: Sequence[torch.Tensor], chunks: List[Tuple[int, ...]]) -> List[List]:
    """Per chunk of ``chunks`` (which cover all rows of each tensor, in order), the tensors' rows
    of that chunk: one ``split`` per tensor, none where one chunk covers them all."""
    if len(chunks) == 1:
        return [list(tensors)]
    lengths = [end - start for start, end, _, _ in chunks]
    return [list(chunk) for chunk in zip(*(values.split(lengths) for values in tensors))]


def columns(table: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The F columns of an (N, F) ``table`` as (N, 1, 1) views, in two calls: the shape in which
    per-crop numbers broadcast over (N, h, w) crops without a reshaping call each time."""
    return table[:, :, None].split(1, dim=1)


def prefix(values: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` rows of ``values``, without a call where that is all of them."""
    return values if len(values) == length else values[:length]


def crop_pixels(chunks: List[Tuple[int, ...]], device: torch.device) -> Callable:
    """``pixels(row0, col0, h, w)`` for crops padded to one of ``chunks``' (h, w), whose first
    pixels are at the (k, 1, 1) columns ``row0``, ``col0``: their (k, h, 1) pixel rows and
    (k, 1, w) pixel columns, then those rows' and columns' pixel centres (i + 0.5, float32: exact,
    as are their sums with the origins). Rows run down and columns across, so that with (k, 1, 1)
    per-crop numbers everything broadcasts to (k, h, w) without a reshaping call per chunk; the
    ranges are made once, for the longest side of all chunks."""
    longest = max(max(h, w) for _, _, h, w in chunks)
    steps = torch.arange(longest, device=device)
    centres = torch.arange(0.5, longest, dtype=torch.float32, device=device)
    steps_down, centres_down = steps[:, None], centres[:, None]

    def pixels(row0, col0, h, w):
        return (
            row0 + prefix(steps_down, h),
            col0 + prefix(steps, w),
            row0 + prefix(centres_down, h),
            col0 + prefix(centres, w),
        )

    return pixels
