"""Instance masks pasted on box crops in batches: Detectron2's ``paste_masks_in_image`` masks, bit
for bit, without its full-image pasting on a GPU."""

import copy

import pytest
import torch
from detectron2.layers import paste_masks_in_image
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from efficientps_d2.modeling import crop_chunks, mask_paste
from efficientps_d2.modeling.fusion import panoptic_postprocess
from efficientps_d2.modeling.mask_paste import paste_masks
from tests.common import NEEDS_CUDA, DeviceReads

H, W = 97, 131


def _detections(num, seed=0, height=H, width=W):
    """Boxes as detector_postprocess leaves them (clipped, not empty): sub-pixel, large, small,
    on the image's edges; probabilities with saturated ones (exactly 1.0), whose border samples
    land exactly on the threshold."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([width * 1.2, height * 1.2]) - 10
    wh = torch.rand(num, 2, generator=g) ** 2 * torch.tensor([width * 0.9, height * 0.9]) + 0.3
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    masks = torch.rand(len(boxes), 28, 28, generator=g)
    masks[::3] = torch.sigmoid(torch.randn(masks[::3].shape, generator=g) * 30)
    assert (masks == 1.0).any()
    return masks, boxes


def _fewest_chunks(monkeypatch):
    """The chunking that CUDA gets (few, padded chunks), on the CPU."""
    monkeypatch.setattr(
        mask_paste, "chunk_crops", lambda sizes, compact: crop_chunks.chunk_crops(sizes, False)
    )


@pytest.mark.parametrize("chunking", ["compact", "fewest", "many"])
def test_masks_equal_detectron2s_on_both_of_its_paths(monkeypatch, chunking):
    """Detectron2's CPU path (one box crop at a time) and its GPU path (the whole image at once,
    run here on the CPU) give the same masks, and so does the batched crop pasting however its
    crops are chunked."""
    if chunking == "fewest":
        _fewest_chunks(monkeypatch)
    if chunking == "many":
        monkeypatch.setattr(crop_chunks, "CHUNK_ELEMENTS", 3000)
    for seed in range(3):
        masks, boxes = _detections(60, seed)
        got = paste_masks(masks, boxes, (H, W))
        assert got.dtype == torch.bool and got.shape == (len(masks), H, W)
        assert torch.equal(got, paste_masks_in_image(masks, boxes, (H, W)))
        whole_image = _do_paste_mask(masks[:, None], boxes, H, W, skip_empty=False)[0] >= 0.5
        assert torch.equal(got, whole_image)


def test_samples_exactly_on_the_threshold_are_decided_as_detectron2_decides(monkeypatch):
    """Thresholds taken from Detectron2's own samples: every float32 operation of the mapping
    must be Detectron2's for the pixels on the threshold to land on the same side."""
    _fewest_chunks(monkeypatch)
    masks, boxes = _detections(40, seed=7)
    soft = _do_paste_mask(masks[:, None], boxes, H, W, skip_empty=False)[0]
    candidates = soft[(soft >= 0.5) & (soft < 1.0)]
    g = torch.Generator().manual_seed(0)
    for threshold in candidates[torch.randint(len(candidates), (20,), generator=g)].tolist():
        expected = paste_masks_in_image(masks, boxes, (H, W), threshold)
        assert torch.equal(paste_masks(masks, boxes, (H, W), threshold), expected), threshold


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masks_of_other_dtypes_are_sampled_in_their_dtype(monkeypatch, dtype):
    _fewest_chunks(monkeypatch)
    masks, boxes = _detections(60, seed=2)
    masks = masks.to(dtype)
    assert torch.equal(
        paste_masks(masks, boxes, (H, W)), paste_masks_in_image(masks, boxes, (H, W))
    )


def test_bfloat16_masks_reach_the_pixel_past_the_box_as_detectron2s():
    """In bfloat16 the grid of a wide box rounds the first pixel centre past its far edges onto
    the edge itself, where a saturated mask samples exactly 0.5: Detectron2's crop (one pixel
    wider than the box) keeps that pixel, and so must the pasting."""
    masks = torch.ones(1, 28, 28, dtype=torch.bfloat16)
    boxes = torch.tensor([[0.0, 2.0, 120.0, 90.0]])
    got = paste_masks(masks, boxes, (H, W))
    assert got[0, 50, 120] and got[0, 90, 50]  # pixel centres 120.5 and 90.5: past x1 and y1
    assert torch.equal(got, paste_masks_in_image(masks, boxes, (H, W)))


def test_a_box_never_reaches_past_its_crop(monkeypatch):
    """A box far off the image, or not ordered, next to a large crop in its chunk: its grown
    crop covers pixels that its own crop does not, and they stay off."""
    _fewest_chunks(monkeypatch)
    masks = torch.ones(3, 28, 28)
    boxes = torch.tensor([[0.0, 0.0, W, H], [W - 40.0, 2.0, 1e9, 15.0], [20.0, 5.0, 10.0, 25.0]])
    got = paste_masks(masks, boxes, (H, W))
    assert torch.equal(got[:2], paste_masks_in_image(masks[:2], boxes[:2], (H, W)))
    assert not got[2].any()  # Detectron2's CPU path cannot take it (an empty range)


def test_non_square_masks_are_refused():
    with pytest.raises(ValueError, match="square"):
        paste_masks(torch.ones(1, 28, 14), torch.tensor([[0.0, 0.0, 9.0, 9.0]]), (H, W))


def test_a_field_named_like_the_unpasted_masks_is_refused():
    """detector_postprocess keeps the M x M masks under that name while Detectron2's runs: a
    caller's field of that name would be overwritten, so it is refused."""
    masks, boxes = _detections(3)
    inst = Instances((H, W), pred_boxes=Boxes(boxes), pred_masks=masks[:, None])
    inst.pred_masks_unpasted = torch.zeros(len(boxes))
    with pytest.raises(ValueError, match="pred_masks_unpasted"):
        mask_paste.detector_postprocess(inst, H, W)


def test_one_device_read_whatever_the_number_of_masks(monkeypatch):
    _fewest_chunks(monkeypatch)
    for num, inference_mode in ((1, False), (40, False), (40, True)):
        masks, boxes = _detections(num, seed=num)
        with torch.inference_mode(inference_mode), DeviceReads() as reads:
            paste_masks(masks, boxes, (H, W))
        assert dict(reads.counts) == {"tolist": 1}


def test_other_thresholds_and_no_masks_are_detectron2s():
    """Below 0.5 a pixel outside its box can pass, and Detectron2's two paths differ: its own
    function decides. None at all: an empty (0, H, W) result."""
    masks, boxes = _detections(20)
    for threshold in (0.3, -1):
        expected = paste_masks_in_image(masks, boxes, (H, W), threshold)
        assert torch.equal(paste_masks(masks, boxes, (H, W), threshold), expected)
    none = paste_masks(masks[:0], boxes[:0], (H, W))
    assert none.shape == (0, H, W)
    assert none.dtype == paste_masks_in_image(masks[:0], boxes[:0], (H, W)).dtype  # uint8


@pytest.mark.parametrize(
    "size, num, roi_masks",
    [((H, W), 30, False), ((60, 80), 30, False), ((H, W), 0, False), ((60, 80), 30, True)],
    ids=["same size", "resized", "no detections", "ROIMasks"],
)
def test_panoptic_postprocess_instances_are_detector_postprocess_ones(size, num, roi_masks):
    """What the model returns as instances: Detectron2's detector_postprocess (scaled, clipped,
    empty boxes dropped, masks pasted into bool masks, the fields in their order), at the input
    size and resized, with no detections, and with Detectron2's ROIMasks."""
    from detectron2.structures import Boxes, Instances, ROIMasks

    masks, boxes = _detections(max(num, 1), seed=5)
    masks, boxes = masks[:num], boxes[:num]
    if num:
        boxes[0] = torch.tensor([10.0, 10.0, 10.0, 20.0])  # empty: dropped
    detections = Instances((H, W))
    detections.pred_boxes = Boxes(boxes)
    detections.pred_masks = ROIMasks(masks) if roi_masks else masks[:, None]
    detections.scores = torch.linspace(0.9, 0.5, len(boxes))
    detections.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
    detections.pred_mask_logits = torch.logit(masks[:, None].clamp(1e-6, 1 - 1e-6))
    # detector_postprocess scales the boxes of the Instances it is given in place.
    expected = detector_postprocess(copy.deepcopy(detections), *size)
    got = panoptic_postprocess(
        torch.randn(3, H, W),
        detections,
        (H, W),
        *size,
        thing_semantic_ids=[2],
        confidence_thresh=0.5,
        overlap_thresh=0.5,
        stuff_area_limit=0,
        mask_logit_scale=4.0,
    )["instances"]
    assert list(got.get_fields()) == list(expected.get_fields())
    assert len(got) == max(len(boxes) - 1, 0) and got.pred_masks.dtype == torch.bool
    for name in ("pred_boxes", "scores", "pred_masks", "pred_mask_logits"):
        a, b = got.get(name), expected.get(name)
        a, b = (a.tensor, b.tensor) if name == "pred_boxes" else (a, b)
        assert torch.equal(a, b), name
    untouched = detections.pred_masks.tensor if roi_masks else detections.pred_masks
    assert untouched.shape[-2:] == (28, 28)


@pytest.mark.parametrize("method", ["loop", "scatter"])
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float64, torch.float16])
def test_panoptic_postprocess_reads_twice_and_equals_its_two_steps(
    monkeypatch, method, scores_dtype
):
    """The fusion's scores and classes come back in detector_postprocess' read: two reads per
    image (that one, then the segment areas; the scatter adds its convergence checks) and two
    non-blocking uploads, with the output of detector_postprocess then panoptic_fusion, a
    dropped box, resizing and float64 scores included."""
    from detectron2.structures import Boxes, Instances

    from efficientps_d2.modeling import fusion

    monkeypatch.setattr(fusion, "_auto_method", lambda device: method)
    masks, boxes = _detections(30, seed=11)
    boxes[4] = torch.tensor([10.0, 10.0, 10.0, 20.0])  # empty: dropped
    detections = Instances((H, W))
    detections.pred_boxes = Boxes(boxes)
    detections.pred_masks = masks[:, None]
    detections.scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(0))
    detections.scores = detections.scores.to(scores_dtype)
    detections.pred_classes = torch.arange(len(boxes)) % 3
    detections.pred_mask_logits = torch.logit(masks[:, None].clamp(1e-6, 1 - 1e-6))
    logits = torch.randn(6, H, W, generator=torch.Generator().manual_seed(1))
    settings = dict(
        thing_semantic_ids=[2, 3, 4],  # one run: no upload to map the classes
        confidence_thresh=0.3,
        overlap_thresh=0.5,
        stuff_area_limit=20,
        mask_logit_scale=4.0,
    )
    for size in ((H, W), (H + 20, W - 9)):
        instances = detector_postprocess(copy.deepcopy(detections), *size)
        resized = panoptic_postprocess(logits, copy.deepcopy(detections), (H, W), *size, **settings)
        pan, info = fusion.panoptic_fusion(resized["sem_seg"], instances, **settings)
        assert any(s["isthing"] for s in info)
        assert torch.equal(resized["panoptic_seg"][0], pan) and resized["panoptic_seg"][1] == info
    with DeviceReads() as reads:
        panoptic_postprocess(logits, copy.deepcopy(detections), (H, W), H, W, **settings)
    reads.counts.pop("equal", None)
    assert dict(reads.counts) == {"tolist": 2, "upload": 2}


def _instances(masks, boxes):
    from detectron2.structures import Boxes, Instances

    instances = Instances((H, W))
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.linspace(0.9, 0.5, len(boxes))
    instances.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
    instances.pred_masks = masks[:, None]
    return instances


@pytest.mark.parametrize("dropped", [False, True], ids=["all kept", "one dropped"])
def test_detector_postprocess_reads_the_device_once(dropped):
    """Detectron2's waits for the device to check the boxes and for each field it filters; this
    one reads once, and uploads the crops (and the kept indices where a box is dropped) in one
    upload that does not wait."""
    masks, boxes = _detections(20, seed=7)
    if dropped:
        boxes[3] = torch.tensor([5.0, 5.0, 5.0, 9.0])
    expected = detector_postprocess(_instances(masks, boxes.clone()), H, W)
    uploads = []
    upload_ints = mask_paste.upload_ints
    with DeviceReads() as reads, pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            mask_paste, "upload_ints", lambda *args: uploads.append(args) or upload_ints(*args)
        )
        got = mask_paste.detector_postprocess(_instances(masks, boxes), H, W)
    assert dict(reads.counts) == {"tolist": 1, "upload": 1}
    assert len(uploads) == 1  # the one upload is the non-blocking one
    assert len(got) == len(boxes) - dropped
    for name in ("pred_boxes", "scores", "pred_masks"):
        a, b = got.get(name), expected.get(name)
        a, b = (a.tensor, b.tensor) if name == "pred_boxes" else (a, b)
        assert torch.equal(a, b), name


def test_detector_postprocess_refuses_boxes_that_are_not_finite_as_detectron2s():
    masks, boxes = _detections(5)
    boxes[1, 2] = float("inf")
    with pytest.raises(AssertionError, match="infinite or NaN"):
        mask_paste.detector_postprocess(_instances(masks, boxes), H, W)


@pytest.mark.parametrize("thing_ids", [[3, 4, 5], [4, 1, 3]], ids=["one run", "scattered"])
def test_panoptic_postprocess_gives_all_class_ids(thing_ids):
    """Mask R-CNN's thing ids 0..T-1 become the all-class ids of thing_semantic_ids, whether
    those are one run of classes (mapped by an offset) or not (by a lookup)."""
    masks, boxes = _detections(12, seed=3)
    detections = Instances((H, W))
    detections.pred_boxes = Boxes(boxes)
    detections.scores = torch.linspace(0.9, 0.5, len(boxes))
    classes = torch.arange(len(boxes)) % 3
    detections.pred_classes = classes.clone()
    detections.pred_mask_logits = torch.logit(masks[:, None].clamp(1e-6, 1 - 1e-6))
    got = panoptic_postprocess(
        torch.randn(6, H, W),
        detections,
        (H, W),
        H,
        W,
        thing_semantic_ids=thing_ids,
        confidence_thresh=0.5,
        overlap_thresh=0.5,
        stuff_area_limit=0,
        mask_logit_scale=4.0,
    )["instances"]
    expected = torch.tensor(thing_ids)[classes[detections.pred_boxes.nonempty()]]
    assert got.pred_classes.dtype == torch.long and torch.equal(got.pred_classes, expected)


@NEEDS_CUDA
def test_cuda_masks_equal_detectron2s():
    masks, boxes = _detections(60)
    masks, boxes = masks.cuda(), boxes.cuda()
    expected = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks, boxes, (H, W))
    assert got.is_cuda and torch.equal(got, expected)


def test_chunk_rows_columns_and_prefix():
    """The per-chunk rows of the tensors the chunks cover, the (N, 1, 1) columns and the prefixes
    that the batched pasting and fusion broadcast with."""
    table = torch.arange(24).view(6, 4)
    chunks = [(0, 2, 5, 5), (2, 6, 3, 3)]
    parts = crop_chunks.chunk_rows([table, table[:, 0]], chunks)
    assert [[p.tolist() for p in part] for part in parts] == [
        [table[:2].tolist(), [0, 4]],
        [table[2:].tolist(), [8, 12, 16, 20]],
    ]
    (whole,) = crop_chunks.chunk_rows([table], [(0, 6, 1, 1)])
    assert whole[0] is table  # one chunk covering the tensor: no call
    cols = crop_chunks.columns(table)
    assert len(cols) == 4 and all(c.shape == (6, 1, 1) for c in cols)
    assert torch.equal(cols[2].flatten(), table[:, 2])
    assert crop_chunks.prefix(table, 6) is table and torch.equal(
        crop_chunks.prefix(table, 2), table[:2]
    )
