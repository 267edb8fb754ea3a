"""Box crops of different sizes grouped into chunks that one batched call handles, each chunk
padded to its largest crop: how the panoptic fusion and the mask pasting batch their work."""

from typing import List, Tuple

__all__ = ["CHUNK_ELEMENTS", "chunk_crops", "padded_elements"]

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
