"""Panoptic fusion on hand-built logits whose right answer is known."""

import functools
import math
import sys

import detectron2.utils.logger
import pytest
import torch
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.structures import Boxes, Instances

from efficientps_d2.modeling import fusion
from efficientps_d2.modeling.fusion import _box_columns, _paste_mask_logits_batched
from tests.common import NEEDS_CUDA, DeviceReads

H, W = 32, 48
HALF = H // 2
M = 28
# Semantic classes: 0 road, 1 sky (stuff); 2 car, 3 person (things -> thing ids 0, 1).
ROAD, SKY, CAR, PERSON = 0, 1, 2, 3
THINGS = [CAR, PERSON]


@pytest.fixture(autouse=True, params=["loop", "scatter"])
def method(request, monkeypatch):
    """Every case runs with both ways of fusing the instances (module docstring of fusion.py)."""
    monkeypatch.setattr(
        sys.modules[__name__],
        "panoptic_fusion",
        functools.partial(fusion.panoptic_fusion, method=request.param),
    )
    return request.param


panoptic_fusion = fusion.panoptic_fusion


def pixel_mask(pattern, value=5.0, m=M):
    """M x M mask logits that paste exactly to +value where `pattern` is True, -value elsewhere.

    `pattern` is given at the box's pixel resolution; each pixel becomes an (m/h) x (m/w) block,
    so every pixel centre samples the middle of a uniform block.
    """
    pattern = torch.as_tensor(pattern, dtype=torch.bool)
    h, w = pattern.shape
    assert m % h == 0 and m % w == 0
    logits = torch.where(pattern, value, -value)
    return logits.repeat_interleave(m // h, dim=0).repeat_interleave(m // w, dim=1)


def full_mask(value=5.0):
    return torch.full((M, M), float(value))


def make_instances(boxes, scores, classes, masks, image_size=(H, W)):
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    inst.pred_mask_logits = (
        torch.stack(masks)[:, None] if masks else torch.zeros(0, 1, M, M)
    ).float()
    return inst


def sky_over_road(num_classes=4):
    """Sky logit 3 on the top half, road logit 3 on the bottom half, every other logit 0."""
    sem = torch.zeros(num_classes, H, W)
    sem[SKY, :HALF] = 3.0
    sem[ROAD, HALF:] = 3.0
    return sem


def fuse(sem, inst, **kwargs):
    kwargs.setdefault("stuff_area_limit", 0)
    return panoptic_fusion(sem, inst, thing_semantic_ids=THINGS, **kwargs)


def check_consistent(pan, segments_info):
    """Ids 1..S, each nonzero id of the map described once with the right area."""
    assert pan.dtype == torch.int32
    assert pan.shape == (H, W)
    ids = [s["id"] for s in segments_info]
    assert ids == list(range(1, len(ids) + 1))
    present = set(pan.unique().tolist()) - {0}
    assert present == set(ids)
    for seg in segments_info:
        assert seg["area"] == int((pan == seg["id"]).sum())
        assert type(seg["area"]) is int and type(seg["category_id"]) is int
        assert type(seg["isthing"]) is bool
        if seg["isthing"]:
            assert type(seg["score"]) is float and type(seg["instance_id"]) is int


def segment_of(segments_info, **match):
    found = [s for s in segments_info if all(s.get(k) == v for k, v in match.items())]
    assert len(found) <= 1
    return found[0] if found else None


def test_single_instance_on_stuff():
    # Box covers rows 4..17, cols 10..23; the mask is its left half, so the instance gets exactly
    # rows 4..17 x cols 10..16 and the masked-out right half goes back to stuff.
    pattern = torch.zeros(14, 14, dtype=torch.bool)
    pattern[:, :7] = True
    inst = make_instances([[10, 4, 24, 18]], [0.9], [0], [pixel_mask(pattern)])
    pan, info = fuse(sky_over_road(), inst)
    check_consistent(pan, info)

    thing = segment_of(info, isthing=True)
    assert thing == {
        "id": 1,
        "isthing": True,
        "category_id": CAR,
        "score": pytest.approx(0.9),
        "instance_id": 0,
        "area": 14 * 7,
    }
    expected_thing = torch.zeros(H, W, dtype=torch.bool)
    expected_thing[4:18, 10:17] = True
    assert torch.equal(pan == 1, expected_thing)

    sky = segment_of(info, isthing=False, category_id=SKY)
    road = segment_of(info, isthing=False, category_id=ROAD)
    top = torch.zeros(H, W, dtype=torch.bool)
    top[:HALF] = True
    assert torch.equal(pan == sky["id"], top & ~expected_thing)
    assert torch.equal(pan == road["id"], ~top & ~expected_thing)
    assert [s["id"] for s in info] == [1, road["id"], sky["id"]] == [1, 2, 3]


def test_box_partly_outside_image_is_clipped_and_never_wins_outside():
    # Stuff logits are poor everywhere (road -50): inside the box the person's fused logit
    # (1 + s(-60)) * (20 - 60) = -40 beats them, but outside its box it must still never win.
    sem = torch.full((4, H, W), -100.0)
    sem[ROAD] = -50.0
    sem[PERSON] = -60.0
    inst = make_instances([[-5.0, 20.0, 10.0, 40.0]], [0.8], [1], [full_mask()])
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    person = segment_of(info, isthing=True)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[20:, :10] = True
    assert person["category_id"] == PERSON and person["area"] == int(expected.sum())
    assert torch.equal(pan == person["id"], expected)
    assert segment_of(info, category_id=ROAD, isthing=False)["area"] == H * W - int(expected.sum())


def test_degenerate_and_off_image_boxes_give_no_segment():
    boxes = [[5, 5, 5, 15], [10, 12, 20, 12], [60, 0, 80, 10], [0, -20, 10, -5]]
    inst = make_instances(boxes, [0.9] * 4, [0] * 4, [full_mask()] * 4)
    pan, info = fuse(sky_over_road(), inst)
    check_consistent(pan, info)
    assert all(not s["isthing"] for s in info)


@pytest.mark.parametrize(
    "overlap_thresh, expected_areas",
    [
        # B overlaps A by 10/14 of its mask; C overlaps A by 2/14, and A u B by 6/14.
        (0.5, {0: 14 * 14, 2: 14 * 12}),
        (0.8, {0: 14 * 14, 1: 14 * 4, 2: 14 * 8}),
        (0.1, {0: 14 * 14}),
    ],
)
def test_overlap_filter(overlap_thresh, expected_areas):
    boxes = [[0, 0, 14, 14], [4, 0, 18, 14], [12, 0, 26, 14]]
    inst = make_instances(boxes, [0.9, 0.8, 0.7], [0, 0, 1], [full_mask()] * 3)
    pan, info = fuse(sky_over_road(), inst, overlap_thresh=overlap_thresh)
    check_consistent(pan, info)
    things = {s["instance_id"]: s["area"] for s in info if s["isthing"]}
    assert things == expected_areas
    # Things are numbered first, in score order.
    assert [s["instance_id"] for s in info if s["isthing"]] == sorted(expected_areas)
    assert [s["id"] for s in info if s["isthing"]] == list(range(1, len(expected_areas) + 1))


def test_overlap_counts_only_mask_pixels_not_boxes():
    # Same boxes, but the higher-scored instance's mask is only the left 2 columns of its box,
    # so the second instance (box fully inside the first) overlaps nothing of it and survives.
    pattern = torch.zeros(14, 14, dtype=torch.bool)
    pattern[:, :2] = True
    inst = make_instances(
        [[0, 0, 14, 14], [4, 0, 11, 7]], [0.9, 0.8], [0, 0], [pixel_mask(pattern), full_mask()]
    )
    pan, info = fuse(sky_over_road(), inst)
    check_consistent(pan, info)
    things = {s["instance_id"]: s["area"] for s in info if s["isthing"]}
    assert things == {0: 14 * 2, 1: 7 * 7}


def test_small_stuff_segment_becomes_void():
    sem = torch.zeros(4, H, W)
    sem[ROAD] = 2.0
    sem[SKY, 0:4, 0:4] = 5.0  # 16-pixel sky patch
    inst = make_instances([], [], [], [])

    pan, info = fuse(sem, inst, stuff_area_limit=20)
    check_consistent(pan, info)
    assert info == [{"id": 1, "isthing": False, "category_id": ROAD, "area": H * W - 16}]
    assert (pan[0:4, 0:4] == 0).all() and int((pan == 0).sum()) == 16

    pan, info = fuse(sem, inst, stuff_area_limit=16)  # area == limit is kept
    check_consistent(pan, info)
    assert segment_of(info, category_id=SKY)["area"] == 16

    pan, info = fuse(sem, inst, stuff_area_limit=H * W)
    assert info == [] and (pan == 0).all()
    # Any limit at or below one pixel keeps every stuff segment, -inf included.
    for limit in (float("-inf"), -3, 0.5):
        pan, info = fuse(sem, inst, stuff_area_limit=limit)
        assert sorted(s["area"] for s in info) == [16, H * W - 16]


def test_scores_are_reported_as_given():
    """A segment's score is the detection's own value, float64 included (not rounded)."""
    pattern = torch.ones(14, 14, dtype=torch.bool)
    for dtype in (torch.float64, torch.float32, torch.float16):
        score = torch.tensor([0.9641874432573424], dtype=dtype)
        inst = make_instances([[10, 4, 24, 18]], [0.9], [0], [pixel_mask(pattern)])
        inst.scores = score
        _, info = fuse(sky_over_road(), inst)
        assert segment_of(info, isthing=True)["score"] == score.item()


def test_thing_class_pixels_without_instance_become_void():
    sem = sky_over_road()
    sem[CAR, 2:6, 30:40] = 10.0  # the semantic head sees a car that no detection backs up
    sem[PERSON, 20:25, 5:8] = 10.0
    inst = make_instances([[0, 0, 8, 8]], [0.9], [0], [full_mask()])
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    assert (pan[2:6, 30:40] == 0).all() and (pan[20:25, 5:8] == 0).all()
    assert int((pan == 0).sum()) == 4 * 10 + 5 * 3
    assert segment_of(info, isthing=True)["area"] == 64


def test_instance_losing_to_stuff_gets_no_segment():
    # Mask logit +0.5 (scaled: 2) passes the filter, but the semantic head says "not a car" (-5),
    # so FL = (s(2) + s(-5)) * (2 - 5) < 0 < the stuff logit 3.
    inst = make_instances([[10, 4, 24, 18]], [0.9], [0], [full_mask(0.5)])
    sem = sky_over_road()
    sem[CAR] = -5.0
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    assert all(not s["isthing"] for s in info)
    assert sorted(s["area"] for s in info) == [H * W // 2, H * W // 2]


def test_instance_losing_to_another_instance_gets_no_segment():
    # Instance 0 (car) claims only its box's left column, so instance 1 (person, inside the
    # unclaimed part) passes the overlap filter; but there the car semantic logit is so strong
    # that instance 0's fused logit, (s(-20) + s(30)) * 10 ~ 10, beats instance 1's
    # (s(1.6) + s(0)) * 1.6 ~ 2.1.
    pattern = torch.zeros(14, 14, dtype=torch.bool)
    pattern[:, 0] = True
    sem = sky_over_road()
    sem[CAR, 0:14, 0:14] = 30.0
    inst = make_instances(
        [[0, 0, 14, 14], [4, 4, 11, 11]],
        [0.9, 0.8],
        [0, 1],
        [pixel_mask(pattern), full_mask(0.4)],
    )
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    things = [s for s in info if s["isthing"]]
    assert [s["instance_id"] for s in things] == [0]
    assert things[0]["area"] == 14 * 14


@pytest.mark.parametrize("mask_logit", [0.0, -1.0])
def test_instance_with_empty_binary_mask_is_dropped(mask_logit):
    # Nowhere does sigmoid(mask logit) exceed 0.5 (a logit of exactly 0 is p = 0.5, not above),
    # so the binary mask is empty and the instance is dropped, though its fused logit,
    # (s(A) + s(10)) * (A + 10) >= 6, would beat the road's 3: its pixels, a car for the semantic
    # head, become void.
    sem = sky_over_road()
    sem[CAR, 18:26, 10:20] = 10.0
    inst = make_instances([[10, 18, 20, 26]], [0.9], [0], [full_mask(mask_logit)])
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    assert all(not s["isthing"] for s in info)
    assert (pan[18:26, 10:20] == 0).all()


def test_detections_below_threshold_are_ignored():
    sem = sky_over_road()
    inst = make_instances(
        [[0, 0, 14, 14], [20, 0, 34, 14]], [0.49, 0.5], [0, 1], [full_mask(), full_mask()]
    )
    pan, info = fuse(sem, inst, confidence_thresh=0.5)
    check_consistent(pan, info)
    things = [s for s in info if s["isthing"]]
    assert [(s["instance_id"], s["category_id"]) for s in things] == [(1, PERSON)]

    pan, info = fuse(sem, inst, confidence_thresh=0.6)
    assert all(not s["isthing"] for s in info)
    assert pan.unique().tolist() == [1, 2]


def test_threshold_and_order_are_those_of_float32_scores():
    """The candidates are selected and ordered on the host as a float32 score tensor would be:
    compared with the threshold rounded to float32 (a score of float32(0.7), below 0.7, passes
    0.7), float64 scores rounded to float32 for both (two that round alike tie, and the first
    instance goes first), past float32's range an infinite threshold."""
    threshold = torch.tensor(0.7).item()
    assert threshold < 0.7
    sem = sky_over_road()
    boxes = [[0, 0, 14, 14], [20, 0, 34, 14], [10, 4, 24, 18]]
    masks = [full_mask()] * 3
    inst = make_instances(boxes, [0.5, threshold, 0.9], [0, 1, 0], masks)
    _, info = fuse(sem, inst, confidence_thresh=0.7)
    assert [s["instance_id"] for s in info if s["isthing"]] == [2, 1]
    _, info = fuse(sem, inst, confidence_thresh=1e39)  # float32: inf, above every score
    assert not any(s["isthing"] for s in info)

    # 0.9 + 1e-12 and 0.9 are one float32 apart from nothing: they tie, in the instances' order.
    inst = make_instances(boxes[:2], [0.9, 0.9], [0, 1], masks[:2])
    inst.scores = torch.tensor([0.9, 0.9 + 1e-12], dtype=torch.float64)
    _, info = fuse(sem, inst)
    things = [s for s in info if s["isthing"]]
    assert [(s["instance_id"], s["score"]) for s in things] == [(0, 0.9), (1, 0.9 + 1e-12)]


@pytest.mark.parametrize("fields", [True, False])
def test_zero_detections_give_pure_semantic_output(fields):
    sem = sky_over_road()
    inst = make_instances([], [], [], []) if fields else Instances((H, W))
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    assert info == [
        {"id": 1, "isthing": False, "category_id": ROAD, "area": H * W // 2},
        {"id": 2, "isthing": False, "category_id": SKY, "area": H * W // 2},
    ]
    assert (pan[:HALF] == 2).all() and (pan[HALF:] == 1).all()


def test_fused_logit_formula():
    # Mask logit 1.5 (scaled: A = 6) against a disagreeing car logit B = -2:
    # FL = (s(6) + s(-2)) * 4 = 4.467. Plain logit sum gives 4, probabilities at most ~1.1, so a
    # stuff logit of 4.3 wins under those but loses to FL, while a stuff logit of 4.6 beats FL.
    a, b = 6.0, -2.0
    fused = (torch.sigmoid(torch.tensor(a)) + torch.sigmoid(torch.tensor(b))) * (a + b)
    assert a + b < 4.3 < fused < 4.6
    mean_prob = (1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(-b))) / 2
    assert mean_prob < 1 / (1 + math.exp(-4.3))

    sem = torch.zeros(4, H, W)
    sem[CAR] = b
    sem[ROAD, :, :24] = 4.3
    sem[SKY, :, 24:] = 4.6
    inst = make_instances([[10, 8, 38, 22]], [0.9], [0], [full_mask(a / 4.0)])
    pan, info = fuse(sem, inst)
    check_consistent(pan, info)

    thing = segment_of(info, isthing=True)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[8:22, 10:24] = True
    assert torch.equal(pan == thing["id"], expected)
    assert segment_of(info, category_id=SKY)["area"] == H * (W - 24)

    # mask_logit_scale matters: with scale 1, A = 1.5 and FL = (s(1.5) + s(-2)) * -0.5 < 0.
    pan, info = fuse(sem, inst, mask_logit_scale=1.0)
    assert all(not s["isthing"] for s in info)


def test_exact_tie_goes_to_stuff():
    # argmax over [stuff ; FL_1 ... FL_n] takes the first maximum, so stuff wins an exact tie
    # (test_overlap_filter covers ties between instances: the higher-scored one wins).
    sem = torch.zeros(4, H, W)
    sem[ROAD] = 30.0  # == FL of a full mask (A = 20, B = 0): (1 + 0.5) * 20
    inst = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
    pan, info = fuse(sem, inst)
    assert all(not s["isthing"] for s in info)


def test_random_scene_is_consistent():
    torch.manual_seed(0)
    num_classes = 6
    things = [2, 4, 5]
    sem = torch.randn(num_classes, H, W) * 3
    k = 12
    xy0 = torch.rand(k, 2) * torch.tensor([W, H]) - 4
    wh = torch.rand(k, 2) * 20 + 1
    boxes = torch.cat([xy0, xy0 + wh], dim=1).tolist()
    inst = make_instances(
        boxes,
        torch.rand(k).tolist(),
        torch.randint(0, 3, (k,)).tolist(),
        list(torch.randn(k, M, M) * 3),
    )
    pan, info = panoptic_fusion(sem, inst, thing_semantic_ids=things, stuff_area_limit=10)
    check_consistent(pan, info)
    for seg in info:
        if seg["isthing"]:
            i = seg["instance_id"]
            assert inst.scores[i] >= 0.5
            assert seg["category_id"] == things[int(inst.pred_classes[i])]
            x0, y0, x1, y1 = boxes[i]
            ys, xs = torch.nonzero(pan == seg["id"], as_tuple=True)
            # pixel centres inside the box
            assert ((xs + 0.5 >= x0) & (xs + 0.5 < x1) & (ys + 0.5 >= y0) & (ys + 0.5 < y1)).all()
        else:
            assert seg["category_id"] not in things and seg["area"] >= 10
    scores = [s["score"] for s in info if s["isthing"]]
    assert scores == sorted(scores, reverse=True)


def test_no_stuff_classes_and_no_thing_classes():
    sem = torch.zeros(2, H, W)
    sem[1] = 1.0
    inst = make_instances([[0, 0, 14, 14]], [0.9], [1], [full_mask()])
    pan, info = panoptic_fusion(sem, inst, thing_semantic_ids=[0, 1], stuff_area_limit=0)
    check_consistent(pan, info)
    assert [(s["isthing"], s["category_id"], s["area"]) for s in info] == [(True, 1, 196)]
    assert int((pan == 0).sum()) == H * W - 196

    pan, info = panoptic_fusion(
        sem, make_instances([], [], [], []), thing_semantic_ids=[], stuff_area_limit=0
    )
    check_consistent(pan, info)
    assert info == [{"id": 1, "isthing": False, "category_id": 1, "area": H * W}]


def test_pixels_with_a_nan_semantic_logit_are_void_and_counted(caplog, monkeypatch):
    """NaN semantic logits (NaN or inf weights, a float16 overflow) gave every such pixel to
    whichever class held the NaN (max and argmax propagate it): an all-NaN image became one
    road segment covering it all, without a word."""
    monkeypatch.setattr(detectron2.utils.logger, "_LOG_TIMER", {})  # the warning's rate limit
    sem = sky_over_road()
    sem[ROAD, HALF:, :8] = float("nan")  # a stuff channel
    sem[PERSON, :4, 16:24] = float("nan")  # a thing channel, under the car's box
    inst = make_instances([[16, 0, 32, 8]], [0.9], [0], [full_mask()])
    with caplog.at_level("WARNING", logger=fusion.__name__):
        pan, info = fuse(sem, inst)
    check_consistent(pan, info)
    nan = sem.isnan().any(dim=0)
    assert (pan[nan] == 0).all() and (pan[~nan] != 0).all()
    car = segment_of(info, isthing=True)
    assert car["area"] == 16 * 8 - 4 * 8
    assert segment_of(info, category_id=ROAD)["area"] == H * W // 2 - HALF * 8
    assert f"{int(nan.sum())} of {H * W} pixels have a NaN semantic logit" in caplog.text

    caplog.clear()
    pan, info = panoptic_fusion(
        torch.full((2, H, W), float("nan")), Instances((H, W)), thing_semantic_ids=[]
    )
    assert info == [] and (pan == 0).all()


def test_paste_matches_detectron2_convention():
    # Away from the box rim (where Detectron2 pads with zeros) bilinear pasting must coincide with
    # Detectron2's paste_masks_in_image sampling.
    torch.manual_seed(0)
    mask = torch.randn(1, 1, M, M)
    box = [3.3, 5.7, 41.2, 29.9]
    centres = (torch.arange(H)[None, :, None] + 0.5, torch.arange(W)[None, None] + 0.5)  # all
    pasted = _paste_mask_logits_batched(mask, *_box_columns(torch.tensor([box])), *centres)[0]
    reference, _ = _do_paste_mask(mask, torch.tensor([box]), H, W, skip_empty=False)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    gx = (xs - box[0]) / (box[2] - box[0]) * M
    gy = (ys - box[1]) / (box[3] - box[1]) * M
    interior = (gx > 0.5) & (gx < M - 0.5) & (gy > 0.5) & (gy < M - 0.5)
    assert interior.sum() > 100
    torch.testing.assert_close(pasted[interior], reference[0][interior])


def test_output_on_input_device_and_dtype():
    sem = sky_over_road().double()
    inst = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
    pan, info = fuse(sem, inst)
    assert pan.dtype == torch.int32 and pan.device == sem.device
    check_consistent(pan, info)


def test_input_validation():
    sem = sky_over_road()
    inst = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
    with pytest.raises(ValueError, match="sem_seg_logits"):
        fuse(sem[0], inst)
    with pytest.raises(ValueError, match="image_size"):
        fuse(sem[:, :-1], inst)
    with pytest.raises(ValueError, match="pred_mask_logits"):
        bad = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
        bad.pred_mask_logits = bad.pred_mask_logits[:, 0]
        fuse(sem, bad)
    with pytest.raises(ValueError, match="pred_mask_logits"):
        bad = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
        bad.pred_mask_logits = bad.pred_mask_logits.repeat(1, 2, 1, 1)
        fuse(sem, bad)
    with pytest.raises(ValueError, match="thing_semantic_ids"):
        panoptic_fusion(sem, inst, thing_semantic_ids=[2, 4])
    with pytest.raises(ValueError, match="thing_semantic_ids"):
        panoptic_fusion(sem, inst, thing_semantic_ids=[-1, 3])
    with pytest.raises(ValueError, match="pred_classes"):
        panoptic_fusion(sem, inst, thing_semantic_ids=[])
    with pytest.raises(ValueError, match="pred_boxes"):
        partial = Instances((H, W))
        partial.scores = torch.tensor([0.9])
        fuse(sem, partial)
    with pytest.raises(ValueError, match="mask_logit_scale"):
        fuse(sem, inst, mask_logit_scale=0.0)
    with pytest.raises(ValueError, match="must not repeat"):
        panoptic_fusion(sem, inst, thing_semantic_ids=[2, 2])
    with pytest.raises(ValueError, match="square"):
        bad = make_instances([[0, 0, 14, 14]], [0.9], [0], [full_mask()])
        bad.pred_mask_logits = bad.pred_mask_logits[..., :14]
        fuse(sem, bad)
    # A class outside the thing ids 0..T-1, above or below, is refused, not clamped to one.
    for classes in ([2], [-1], [0, 2]):
        bad = make_instances(
            [[0, 0, 14, 14]] * len(classes),
            [0.9] * len(classes),
            classes,
            [full_mask()] * len(classes),
        )
        with pytest.raises(
            ValueError, match=r"pred_classes must be contiguous thing ids in \[0, 2\)"
        ):
            fuse(sem, bad)
    with pytest.raises(ValueError, match="method"):
        panoptic_fusion(sem, inst, thing_semantic_ids=THINGS, method="fast")


@NEEDS_CUDA
def test_cuda_matches_cpu():
    torch.manual_seed(1)
    sem = torch.randn(6, H, W) * 3
    k = 10
    xy0 = torch.rand(k, 2) * torch.tensor([W, H])
    boxes = torch.cat([xy0, xy0 + torch.rand(k, 2) * 20 + 1], dim=1).tolist()
    inst = make_instances(
        boxes,
        torch.rand(k).tolist(),
        torch.randint(0, 3, (k,)).tolist(),
        list(torch.randn(k, M, M)),
    )
    kwargs = dict(thing_semantic_ids=[2, 4, 5], stuff_area_limit=10)
    pan, info = panoptic_fusion(sem, inst, **kwargs)
    pan_gpu, info_gpu = panoptic_fusion(sem.cuda(), inst.to("cuda"), **kwargs)
    assert pan_gpu.device.type == "cuda"
    assert torch.equal(pan_gpu.cpu(), pan)
    assert info_gpu == info


def random_scene(k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sem = torch.randn(6, H, W, generator=generator) * 3
    xy0 = torch.rand(k, 2, generator=generator) * torch.tensor([W, H]) - 4
    wh = torch.rand(k, 2, generator=generator) * 20 + 1
    inst = make_instances(
        torch.cat([xy0, xy0 + wh], dim=1).tolist(),
        (torch.rand(k, generator=generator) * 0.5 + 0.5).tolist(),
        torch.randint(0, 3, (k,), generator=generator).tolist(),
        list(torch.randn(k, M, M, generator=generator) * 3),
    )
    return sem, inst


@pytest.mark.parametrize("inference_mode", [False, True], ids=["grad mode", "inference mode"])
@pytest.mark.parametrize("k", [0, 1, 24])
def test_device_reads_do_not_grow_with_detections(k, method, inference_mode, monkeypatch):
    """Two reads per image (the detections' scores, boxes and classes, then every number of
    segments_info), one non-blocking upload (least areas, the candidates' crops), plus for
    "scatter" one convergence check per fusion._ROUNDS_PER_CHECK rounds: nothing per detection.
    Also under inference_mode, where EfficientPS.inference runs it."""
    sem, inst = random_scene(k)
    uploads = []
    upload_ints = fusion.upload_ints
    monkeypatch.setattr(
        fusion, "upload_ints", lambda *args: uploads.append(args) or upload_ints(*args)
    )
    with torch.inference_mode(inference_mode), DeviceReads() as reads:
        pan, info = panoptic_fusion(sem, inst, thing_semantic_ids=[2, 4, 5])
    assert any(s["isthing"] for s in info) == (k > 0)  # the scene does have instances
    checks = reads.counts.pop("equal", 0)
    assert dict(reads.counts) == {"tolist": 2 if k else 1, "upload": 1}
    assert len(uploads) == 1  # the one upload is the non-blocking one
    if method == "loop":
        assert checks == 0
    else:
        assert checks <= math.ceil(k / fusion._ROUNDS_PER_CHECK)
