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
7. A pixel with a NaN among its semantic logits is void (broken weights or inputs, or a float16
   overflow, give NaN logits; their argmax would be whichever class holds the NaN): a warning
   counts such pixels.

All detections are pasted at once (one ``grid_sample`` per chunk of boxes, padded to the chunk's
largest box: for the loop, chunks at most about half padding; for the scatter, as few chunks as
``crop_chunks.CHUNK_ELEMENTS`` allows). Steps 3-5 then run in one of two ways, with the same
result:

- ``"loop"`` (the default off CUDA): the instances are visited in score order, each with a few
  tensor ops on its box crop; the least work, best where a kernel launch is cheap (CPU).
- ``"scatter"`` (the default on CUDA): every instance at once, with a number of kernels that
  grows with the chunks, not with the instances. The overlap filter is solved as a fixed point:
  an instance's fate depends only on the higher-scored ones', so "keep every non-empty instance"
  refined by scattering the lowest kept instance index onto each pixel is exact after at most K
  rounds, and in practice stops after a handful (the check costs one tiny read per four rounds).

Either way the fusion reads the device twice per image, whatever the number of detections: once
every detection's score, box and class, from which the host selects and sorts the candidates and
works out their crops (tensor shapes need their sizes on the host), and once, at the end, the
segment areas. On CUDA, ``torch.bincount`` (the segment areas) adds two small reads of its own,
of the codes' minimum and maximum, just before that last copy, when little work is left to
overlap; the scatter's convergence checks add one per four rounds. The one upload (each
segment's least area and the candidates' indices, pixel ranges and semantic classes) does not
wait for the device. Every operator call costs host time on a GPU (some 20-45 us for one that
launches a kernel, a few us for a view), so the code computes once what each chunk or round
would otherwise repeat, keeps per-candidate numbers as [n, 1, 1] columns that broadcast over the
crops, and leaves to the host what it knows already. Memory stays at a few H x W maps plus the
padded crops (the loop holds one chunk of at most ``CHUNK_ELEMENTS``, the scatter all of
them, up to ``_SCATTER_ELEMENTS``, past which it takes compact chunks, then the loop). The result
equals visiting the instances one by one (the reference behaviour, kept in
``tests/test_fast_paths.py``).
"""

import logging
import math
import struct
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import log_every_n_seconds
from torch.nn import functional as F

from .crop_chunks import chunk_crops, chunk_rows, columns, crop_pixels, padded_elements
from .mask_paste import detector_postprocess_and_read, sampling_grid, upload_ints

__all__ = ["panoptic_fusion", "panoptic_postprocess"]

_REQUIRED_FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_mask_logits")


# Most padded crop elements the "scatter" method holds at once (about 20 bytes each).
_SCATTER_ELEMENTS = 1 << 25
# Fixed-point rounds of the "scatter" overlap filter between two checks for convergence.
_ROUNDS_PER_CHECK = 4
_METHODS = ("auto", "loop", "scatter")


def _on(tensor: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """``tensor.to(device, dtype)``, without the call where it is already there (each call costs
    host time on a GPU)."""
    if tensor.device == device and (dtype is None or tensor.dtype == dtype):
        return tensor
    return tensor.to(device) if dtype is None else tensor.to(device, dtype)


def _float32(value: float) -> float:
    """``value`` rounded to float32 as a cast does (what a float32 tensor compares a Python float
    with): to nearest, infinite past the largest float32."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _pixel_range(x0: float, y0: float, x1: float, y1: float, height: int, width: int):
    """Pixels [start, end) whose centres (i + 0.5) fall inside the finite box (x0, y0, x1, y1),
    clipped to the image: (row_start, row_end, col_start, col_end). "ceil(x - 0.5)" in float64
    (Python's floats) on float32 coordinates is exact."""
    col0, row0, col1, row1 = (math.ceil(v - 0.5) for v in (x0, y0, x1, y1))
    return (
        min(max(row0, 0), height),
        min(max(row1, 0), height),
        min(max(col0, 0), width),
        min(max(col1, 0), width),
    )


def _box_columns(boxes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(x0, y0, half width, half height) of the [K, 4] float32 boxes as (K, 1, 1) columns, the
    extents rounded from float64, as Python floats are in Detectron2's one-box-at-a-time
    pasting: every value matches it bit for bit."""
    boxes64 = boxes.double()
    half = (boxes64[:, 2:] - boxes64[:, :2]).float() / 2  # (width, height) / 2
    return columns(boxes)[:2] + columns(half)


def _paste_mask_logits_batched(
    mask_logits: torch.Tensor,
    x0: torch.Tensor,
    y0: torch.Tensor,
    half_width: torch.Tensor,
    half_height: torch.Tensor,
    row_centres: torch.Tensor,
    col_centres: torch.Tensor,
) -> torch.Tensor:
    """
    Bilinearly sample K masks onto pixel crops of their boxes, all padded to one size.

    Args:
        mask_logits: [K, 1, M, M] float logits.
        x0, y0, half_width, half_height: [K, 1, 1] float32 boxes in image pixels (see
            :func:`_box_columns`), with positive extents.
        row_centres, col_centres: [K, h, 1] and [K, 1, w] float32 centres (i + 0.5) of the pixel
            rows and columns of each crop, padded to one size (past an instance's own crop, the
            entries are meaningless).

    Returns:
        [K, h, w] logits; element (k, i, j) is pixel (row_centres[k, i], col_centres[k, j]).
    """
    # Detectron2's mapping in paste_masks_in_image.
    grid = sampling_grid(x0, y0, half_width, half_height, row_centres, col_centres)
    # Border padding, not zero padding: a zero logit means p = 0.5, not background, so padding with
    # it would smear an undecided rim along the box edge. Outside the box nothing is sampled.
    return F.grid_sample(mask_logits, grid, align_corners=False, padding_mode="border")[:, 0]


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


def _validate(
    sem_seg_logits: torch.Tensor,
    instances: Instances,
    thing_ids: List[int],
    mask_logit_scale: float,
    method: str,
) -> None:
    """Checks everything that is known on the host; the classes' range is checked with the
    candidates' crops (:func:`_candidates`), so that no device is read here."""
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
    if any(not 0 <= c < num_classes for c in thing_ids):
        raise ValueError(
            f"thing_semantic_ids must lie in [0, {num_classes}) (C = sem_seg_logits.shape[0]), "
            f"got {thing_ids}"
        )
    if len(set(thing_ids)) != len(thing_ids):
        raise ValueError(f"thing_semantic_ids must not repeat a class, got {thing_ids}")
    if not mask_logit_scale > 0:
        raise ValueError(f"mask_logit_scale must be positive, got {mask_logit_scale}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")

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
    if num_det and not thing_ids:
        raise ValueError(
            "instances.pred_classes must be contiguous thing ids in [0, 0) "
            "(T = len(thing_semantic_ids)): there are detections but no thing classes"
        )


def panoptic_fusion(
    sem_seg_logits: torch.Tensor,
    instances: Instances,
    *,
    thing_semantic_ids: Union[Sequence[int], torch.Tensor],
    confidence_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    stuff_area_limit: int = 2048,
    mask_logit_scale: float = 4.0,
    method: str = "auto",
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Fuse semantic and instance predictions of one image (see the module docstring).

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
        method: "loop", "scatter" or "auto" ("scatter" on CUDA, else "loop"); same result.

    Returns:
        panoptic_seg: int32 [H, W] on sem_seg_logits' device; 0 is void, segments are 1..S.
        segments_info: one dict per segment, things first (by score) then stuff (by class), with
            all-class ``category_id`` (semantic class index 0..C-1) for both: things
            ``{"id", "isthing": True, "category_id", "score", "instance_id" (index into
            ``instances``), "area"}``; stuff ``{"id", "isthing": False, "category_id", "area"}``.
    """
    return _panoptic_fusion(
        sem_seg_logits,
        instances,
        thing_semantic_ids,
        confidence_thresh,
        overlap_thresh,
        stuff_area_limit,
        mask_logit_scale,
        method,
        host=None,
    )


def _auto_method(device: torch.device) -> str:
    """The method that "auto" takes on ``device``."""
    return "scatter" if device.type == "cuda" else "loop"


@torch.no_grad()
def _panoptic_fusion(
    sem_seg_logits,
    instances,
    thing_semantic_ids,
    confidence_thresh,
    overlap_thresh,
    stuff_area_limit,
    mask_logit_scale,
    method,
    host,
):
    """:func:`panoptic_fusion`, given what the host knows of the instances already (a
    :class:`_HostCopy`, or None to read it)."""
    if isinstance(thing_semantic_ids, torch.Tensor):
        thing_id_list = [int(c) for c in thing_semantic_ids.flatten().tolist()]
        if thing_semantic_ids.dim() != 1:
            raise ValueError(
                f"thing_semantic_ids must be 1-D, got shape {tuple(thing_semantic_ids.shape)}"
            )
    else:
        thing_id_list = [int(c) for c in thing_semantic_ids]
    _validate(sem_seg_logits, instances, thing_id_list, mask_logit_scale, method)
    device = sem_seg_logits.device
    if method == "auto":
        method = _auto_method(device)

    sem = _on(sem_seg_logits, device, torch.float32)
    num_classes, height, width = sem.shape
    things = set(thing_id_list)
    stuff_id_list = [c for c in range(num_classes) if c not in things]
    if stuff_id_list:
        stuff_val = _class_max(sem, stuff_id_list)
    else:
        stuff_val = torch.full((height, width), float("-inf"), device=device)

    candidates = _candidates(
        instances, device, height, width, confidence_thresh, len(thing_id_list), host
    )
    num = 0 if candidates is None else len(candidates.crops)
    # One code per pixel: j where candidate j won step 5, n + c where stuff did and its semantic
    # argmax class is c (0..C-1), n + C where a semantic logit is NaN (void, step 7). One
    # bincount gives every area, and a code makes a segment iff its area reaches its least area:
    # 1 for a candidate (one that was dropped wins no pixel), the limit (at least 1: areas are
    # whole) for a stuff class, never (more than the image) for a thing class or void. The one
    # upload: these least areas and, with candidates, their indices into the instances, and
    # their pixel ranges and semantic classes as columns (col_start, row_start, col_end,
    # row_end, class), all known on the host once the candidates are.
    never = height * width + 1
    stuff_least = math.ceil(max(stuff_area_limit, 1)) if stuff_area_limit < never else never
    least_areas = [1] * num + [never if c in things else stuff_least for c in range(num_classes)]
    least_areas.append(never)
    if not num:
        least_areas = upload_ints(least_areas, device)
    else:
        r0s, r1s, c0s, c1s = zip(*candidates.crops)
        sem_ids = [thing_id_list[c] for c in candidates.class_list]
        uploaded = upload_ints(
            least_areas + candidates.order_list + [*c0s, *r0s, *c1s, *r1s, *sem_ids], device
        )
        least_areas, order, per_candidate = uploaded.split([len(least_areas), num, 5 * num])
        per_candidate = per_candidate.view(5, num, 1, 1).unbind(0)

    # (max(dim).indices is argmax, first maximum included, but several times faster on CPU; its
    # values are NaN where one is.)
    sem_max = sem.max(dim=0)
    code = sem_max.indices.to(torch.int32)
    if num:
        code += num
        masks = _on(instances.pred_mask_logits, device, torch.float32)[order]
        sizes = [(r1 - r0, c1 - c0) for r0, r1, c0, c1 in candidates.crops]
        # The loop's cost is per instance anyway: compact chunks. The scatter runs some 10
        # kernels per chunk and round whatever the chunk holds: the fewest chunks.
        chunks = chunk_crops(sizes, compact=method == "loop")
        if method == "scatter" and padded_elements(chunks) > _SCATTER_ELEMENTS:
            chunks = chunk_crops(sizes)  # less padding, more kernels
            if padded_elements(chunks) > _SCATTER_ELEMENTS:
                method = "loop"
        pasted = _pasted_chunks(
            sem, masks, candidates.boxes[order], per_candidate, chunks, mask_logit_scale
        )
        if method == "scatter":
            _fuse_by_scatter(pasted, chunks, stuff_val, code, overlap_thresh)
        else:
            _fuse_by_loop(pasted, candidates.crops, stuff_val, code, overlap_thresh)
    void_code = num + num_classes
    code = code.masked_fill_(sem_max.values.isnan(), void_code)
    areas = torch.bincount(code.flatten(), minlength=void_code + 1)
    present = areas >= least_areas  # segment order: things, then stuff, as the codes
    panoptic_seg = (torch.cumsum(present, 0, dtype=torch.int32) * present)[code]

    # The one read at the end.
    area_list = areas.tolist()
    if area_list[void_code]:
        log_every_n_seconds(
            logging.WARNING,
            f"{area_list[void_code]} of {height * width} pixels have a NaN semantic logit and "
            "are void in the panoptic map: the model's weights or input hold NaN or inf (or its "
            "float16 inference, MODEL.EFFICIENTPS.INFERENCE_DTYPE, overflowed).",
            n=60,
            name=__name__,
        )

    segments_info: List[Dict] = []
    for j in range(num):
        if area_list[j]:
            segments_info.append(
                {
                    "id": len(segments_info) + 1,
                    "isthing": True,
                    "category_id": thing_id_list[candidates.class_list[j]],
                    "score": candidates.score_list[j],
                    "instance_id": candidates.order_list[j],
                    "area": area_list[j],
                }
            )
    for cls in stuff_id_list:
        if area_list[num + cls] >= stuff_least:
            segments_info.append(
                {
                    "id": len(segments_info) + 1,
                    "isthing": False,
                    "category_id": cls,
                    "area": area_list[num + cls],
                }
            )
    return panoptic_seg, segments_info


class _Candidates(NamedTuple):
    """Steps 1-2's selection, by score: ``boxes`` [K, 4] float32, the instances' boxes on the
    device; on the host ``crops`` (n (row_start, row_end, col_start, col_end)) and the
    candidates' indices into the instances, classes and scores."""

    boxes: torch.Tensor
    crops: List[Tuple[int, int, int, int]]
    order_list: List[int]
    class_list: List[int]
    score_list: List[float]


def _read_fields(instances: Instances, device: torch.device) -> List[torch.Tensor]:
    """The [K] tensors besides the boxes that the host selects the candidates from (see
    :func:`_candidates`), for one read: the scores in float32 (compared and sorted as such), the
    scores as given where float64 (reported as such), the classes. float32 holds every class in
    range, coordinate and score exactly (a read concatenates them in the scores' dtype); a class
    out of range stays out of range."""
    raw_scores = _on(instances.scores, device)
    fields = [raw_scores if raw_scores.dtype == torch.float32 else raw_scores.float()]
    if raw_scores.dtype == torch.float64:
        fields.append(raw_scores)
    return fields + [_on(instances.pred_classes, device)]


class _HostCopy(NamedTuple):
    """The instances as the host knows them from one read, per instance: ``ranked`` (float32)
    and ``reported`` scores, ``classes``, and ``corners``, the XYXY boxes, flat."""

    ranked: List[float]
    reported: List[float]
    classes: List[float]
    corners: List[float]

    @classmethod
    def of(cls, fields: List[List[float]], corners: List[float]) -> "_HostCopy":
        """From the values of :func:`_read_fields`' tensors and the boxes' corners."""
        ranked, *reported, classes = fields
        return cls(ranked, reported[0] if reported else ranked, classes, corners)


def _candidates(
    instances, device, height, width, confidence_thresh, num_things, host=None
) -> Optional[_Candidates]:
    """
    Steps 1-2's selection: detections scoring at least ``confidence_thresh`` whose box is finite
    and covers some pixel centre, by score (stable). Unless the caller read them already
    (``host``, a :class:`_HostCopy`), the one read before the end: every detection's score,
    box and class (and whether every class is a thing id: an error otherwise), from which the
    host selects, sorts and crops, as Python numbers.

    Returns:
        None if there is none, else a :class:`_Candidates`.
    """
    if not instances.get_fields() or len(instances) == 0:
        return None
    count = len(instances)
    boxes = _on(instances.pred_boxes.tensor, device, torch.float32)
    if host is None:
        fields = _read_fields(instances, device)
        values = torch.cat(fields + [boxes.flatten()]).tolist()
        host = _HostCopy.of(
            [values[i * count : (i + 1) * count] for i in range(len(fields))],
            values[len(fields) * count :],
        )
    if min(host.classes) < 0 or max(host.classes) >= num_things:
        raise ValueError(
            f"instances.pred_classes must be contiguous thing ids in [0, {num_things}) "
            f"(T = len(thing_semantic_ids)), got {instances.pred_classes.tolist()}"
        )
    ranked, corners = host.ranked, host.corners
    # As "scores >= confidence_thresh" on a float32 tensor: in float32.
    threshold = _float32(confidence_thresh)
    selected = []
    corners = iter(corners)
    for i, (score, *box) in enumerate(zip(ranked, corners, corners, corners, corners)):
        # Four float32 values add up to a finite float64 exactly when each is finite.
        if score >= threshold and math.isfinite(sum(box)):
            r0, r1, c0, c1 = _pixel_range(*box, height, width)
            # Empty pixel ranges also drop the boxes with x1 <= x0 or y1 <= y0 (ceil is monotonic).
            if r1 > r0 and c1 > c0:
                selected.append((i, (r0, r1, c0, c1)))
    if not selected:
        return None
    selected.sort(key=lambda item: -ranked[item[0]])  # stable: ties keep the instances' order
    order_list = [i for i, _ in selected]
    return _Candidates(
        boxes,
        [crop for _, crop in selected],
        order_list,
        [int(host.classes[i]) for i in order_list],
        [host.reported[i] for i in order_list],
    )


def _pasted_chunks(sem, masks, boxes, per_candidate, chunks, mask_logit_scale):
    """For each of the ``chunks`` (see :func:`chunk_crops`): (start, end, fused logits FL, binary
    masks, inside-the-crop flags, flat pixel index), all [k, h, w], padding included (inside is
    False there). ``per_candidate``: (col_start, row_start, col_end, row_end, semantic class) of
    each candidate's pixels, as [n, 1, 1] columns; ``masks`` [n, 1, M, M], ``boxes`` [n, 4]."""
    height, width = sem.shape[-2:]
    pixels = crop_pixels(chunks, sem.device)
    per_candidate = (masks,) + _box_columns(boxes) + tuple(per_candidate)
    for (start, end, h, w), part in zip(chunks, chunk_rows(per_candidate, chunks)):
        part_masks, x0, y0, half_w, half_h, col0, row0, col1, row1, sem_ids = part
        rows, cols, row_centres, col_centres = pixels(row0, col0, h, w)
        inside = (rows < row1) & (cols < col1)
        mla = _paste_mask_logits_batched(
            part_masks, x0, y0, half_w, half_h, row_centres, col_centres
        )
        mla = mla * mask_logit_scale
        # MLB: the semantic logit of each instance's class on its crop (the padding reads clamped
        # pixels and is never used).
        rows, cols = rows.clamp_(max=height - 1), cols.clamp_(max=width - 1)
        mlb = sem[sem_ids, rows, cols]
        fused = (mla.sigmoid() + mlb.sigmoid()) * (mla + mlb)
        binary = (mla > 0) & inside  # sigmoid(mla) > 0.5
        yield start, end, fused, binary, inside, rows * width + cols


def _fuse_by_loop(pasted, crops, stuff_val, code, overlap_thresh):
    """Steps 3-5, instance by instance on its crop: writes j into the int32 [H, W] ``code`` where
    candidate j wins a pixel (stuff's codes there are n or more), from the candidates'
    :func:`_pasted_chunks` ``pasted`` and their (row start, row end, col start, col end)
    ``crops``."""
    best_val = stuff_val.clone()
    claimed = torch.zeros(code.shape, dtype=torch.bool, device=code.device)
    for start, end, fused, binary, _, _ in pasted:
        areas = binary.sum(dim=(1, 2))
        # float64, as the Python arithmetic of the one-at-a-time definition.
        limits = areas.double() * overlap_thresh
        # Split per instance in one call each, not one (or two) per instance.
        per_instance = (binary.unbind(0), fused.unbind(0), (areas > 0).unbind(0), limits.unbind(0))
        for k, (mask, fl, nonempty, limit) in enumerate(zip(*per_instance)):
            r0, r1, c0, c1 = crops[start + k]
            crop = (slice(r0, r1), slice(c0, c1))
            mask, fl = mask[: r1 - r0, : c1 - c0], fl[: r1 - r0, : c1 - c0]
            region_claimed = claimed[crop]
            keep = nonempty & ((mask & region_claimed).sum() <= limit)
            region_claimed |= mask & keep

            region_val = best_val[crop]
            wins = (fl > region_val) & keep
            torch.where(wins, fl, region_val, out=region_val)
            code[crop].masked_fill_(wins, start + k)


def _fuse_by_scatter(pasted, chunks, stuff_val, code, overlap_thresh):
    """Steps 3-5 for all instances at once, with the result of :func:`_fuse_by_loop`, from the
    candidates' :func:`_pasted_chunks` ``pasted``, made for their ``chunks``.

    Candidate k is kept iff its binary mask is non-empty and at most ``overlap_thresh`` of it lies
    on pixels whose lowest-indexed kept candidate covering them has index < k. That depends only on
    the candidates before k, so iterating "kept <- that test applied to kept" from any start is
    exact for candidates 0..t-1 after t rounds, and a round that changes nothing has reached the
    unique solution. Then each pixel goes to the first candidate reaching the highest FL there, if
    that beats the stuff logit: what the loop's strict ">" updates in score order give.

    Everything a round does not change is made once per chunk, as [k, h, w] (per-candidate
    numbers as [k, 1, 1]): ``own``, the candidate's index on its mask and n elsewhere; ``below``,
    the same with -1 elsewhere (no candidate index is below it); the fused logits, -inf outside
    the crop and where NaN (neither ever wins, as a NaN never does in the loop).
    """
    height, width = code.shape
    device = code.device
    num = chunks[-1][1]  # the candidates
    parts = []
    for start, end, fused, binary, inside, flat in pasted:
        ids = torch.arange(start, end, dtype=torch.int32, device=device).view(-1, 1, 1)
        fused = torch.where(inside, fused.nan_to_num(-math.inf, math.inf, -math.inf), float("-inf"))
        own, below = torch.where(binary, ids, num), torch.where(binary, ids, -1)
        areas = binary.sum(dim=(1, 2), keepdim=True)
        parts.append((ids, own, below, fused, flat, flat.view(-1), areas))
    whole = len(parts) == 1

    def cat(tensors):
        return tensors[0] if whole else torch.cat(tensors)

    def split(values):
        return [part for (part,) in chunk_rows([values], chunks)]

    areas = cat([part[-1] for part in parts])
    nonempty = areas > 0
    # float64, as in the loop; -1 for an empty mask, which is never kept.
    limits = torch.where(nonempty, areas.double() * overlap_thresh, -1.0)

    def refine(kept):
        first = torch.full((height * width,), num, dtype=torch.int32, device=device)
        for kept_part, (_, own, _, _, _, flat_1d, _) in zip(split(kept), parts):
            own = torch.where(kept_part, own, num)
            first.scatter_reduce_(0, flat_1d, own.view(-1), "amin")
        overlaps = cat(
            [
                (first[flat] < below).sum(dim=(1, 2), keepdim=True)
                for _, _, below, _, flat, _, _ in parts
            ]
        )
        return overlaps <= limits

    kept = nonempty
    for rounds in range(1, num + 1):
        refined = refine(kept)
        if rounds == num or (rounds % _ROUNDS_PER_CHECK == 0 and torch.equal(refined, kept)):
            kept = refined
            break
        kept = refined

    stuff_val = stuff_val.view(-1)
    best_val = stuff_val.clone()
    contenders = []
    for kept_part, (ids, _, _, fused, flat, flat_1d, _) in zip(split(kept), parts):
        values = torch.where(kept_part, fused, float("-inf"))
        contenders.append((ids, values, flat, flat_1d))
        best_val.scatter_reduce_(0, flat_1d, values.view(-1), "amax")
    # The best value where it beats the stuff logit, else NaN (which no value equals).
    best_val = torch.where(best_val > stuff_val, best_val, float("nan"))
    # Each pixel's lowest winning candidate, below stuff's codes (n or more); no code is above
    # what the others give.
    code = code.view(-1)
    for ids, values, flat, flat_1d in contenders:
        own = torch.where(values == best_val[flat], ids, torch.iinfo(torch.int32).max)
        code.scatter_reduce_(0, flat_1d, own.view(-1), "amin")


def _readable(detections: Instances) -> bool:
    """Whether :func:`_read_fields` can read the scores and classes of ``detections``: [K]
    tensors beside Boxes."""
    if not all(detections.has(name) for name in ("pred_boxes", "scores", "pred_classes")):
        return False
    boxes, scores, classes = detections.pred_boxes, detections.scores, detections.pred_classes
    return (
        isinstance(boxes, Boxes)
        and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in (scores, classes))
        and len(scores) == len(classes) == len(boxes)
        and scores.device == classes.device == boxes.device
    )


def panoptic_postprocess(
    sem_seg_logits: torch.Tensor,
    detections: Instances,
    image_size: Tuple[int, int],
    height: int,
    width: int,
    *,
    thing_semantic_ids: Sequence[int],
    confidence_thresh: float,
    overlap_thresh: float,
    stuff_area_limit: int,
    mask_logit_scale: float,
) -> Dict:
    """
    One image's network outputs -> EfficientPS's output dict at (height, width): the eager model
    and an exported one (``efficientps_d2.export``) both end here.

    Args:
        sem_seg_logits: (C, H_pad, W_pad) logits of the padded input; only its top-left
            ``image_size`` is the image.
        detections: Instances at ``image_size`` (see :func:`panoptic_fusion`; ``pred_classes``
            are thing ids 0..T-1).
        image_size: (h, w) of the network's input image, before padding.
        height, width: the output size.
        thing_semantic_ids, confidence_thresh, overlap_thresh, stuff_area_limit,
            mask_logit_scale: as for :func:`panoptic_fusion`.

    Returns:
        {"sem_seg": (C, height, width) logits, "instances": the detections at (height, width)
        with all-class ``pred_classes``, "panoptic_seg": (int32 (height, width) segment ids,
        segments_info with all-class category ids)}.
    """
    if (height, width) == tuple(image_size):
        # What sem_seg_postprocess gives, without its same-size (identity) interpolation (nor a
        # call to crop where there is no padding).
        sem_seg = sem_seg_logits
        if sem_seg.shape[-2:] != (height, width):
            sem_seg = sem_seg[:, :height, :width]
    else:
        sem_seg = sem_seg_postprocess(sem_seg_logits, image_size, height, width)
    # The fusion's scores and classes come back in detector_postprocess' read, with the boxes:
    # one wait for the device fewer.
    also_read = (
        _read_fields(detections, detections.pred_boxes.device) if _readable(detections) else []
    )
    instances, read = detector_postprocess_and_read(detections, height, width, also_read)
    panoptic_seg, segments_info = _panoptic_fusion(
        sem_seg,
        instances,
        thing_semantic_ids,
        confidence_thresh,
        overlap_thresh,
        stuff_area_limit,
        mask_logit_scale,
        "auto",
        host=_HostCopy.of(*read) if read is not None and also_read else None,
    )
    # Mask R-CNN numbers things 0..T-1; users, Visualizer and Detectron2's evaluators expect the
    # all-class contiguous ids of the "standard" panoptic metadata, which the fusion already gives.
    # Where those are one run of classes (Cityscapes', COCO's) an offset maps them, without an
    # upload.
    classes = instances.pred_classes
    thing_ids = [int(c) for c in thing_semantic_ids]
    first = thing_ids[0] if thing_ids else 0
    if classes.dtype == torch.long and thing_ids == list(range(first, first + len(thing_ids))):
        instances.pred_classes = classes + first
    else:
        instances.pred_classes = upload_ints(thing_ids, classes.device)[classes]
    return {
        "sem_seg": sem_seg,
        "instances": instances,
        "panoptic_seg": (panoptic_seg, segments_info),
    }
