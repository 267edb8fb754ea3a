"""Inference fast paths give the plain path's results: the fused copy of the network
(MODEL.EFFICIENTPS.FAST_INFERENCE), the batched panoptic fusion, the semantic head's
project-then-upsample predictor, and activation checkpointing in the semantic head."""

import copy
import dataclasses
import gc
import io
import logging
import math
import threading
import types
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ROIAlign, ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from efficientps_d2.modeling import crop_chunks, fusion, threaded_roi_align
from efficientps_d2.modeling.fast_inference import (
    ConvLeakyReLU,
    FixedShapeRoiHeads,
    SizeLRUCache,
    batched_nms,
    box_detections,
    fold_batch_norms,
    fuse_conv_leaky_relu,
    fuse_for_inference,
    pool_rois,
    pool_rois_fixed,
    rpn_proposals,
    top_anchors,
)
from efficientps_d2.modeling.fusion import panoptic_fusion
from efficientps_d2.modeling.inplace_abn import InPlaceABN
from efficientps_d2.modeling.layers import add_upsampled_into
from efficientps_d2.modeling.semantic_head import EfficientPSSemSegHead
from efficientps_d2.modeling.threaded_roi_align import (
    ThreadedROIAlign,
    image_parts,
    thread_roi_poolers,
)
from tests.common import (
    DEVICES,
    NEEDS_CUDA,
    PERMISSIVE,
    THING_SEMANTIC_IDS,
    DeviceReads,
    tiny_config,
    training_input,
)


def _randomize(model, seed=0):
    """Non-trivial BN affine parameters and statistics (so that folding does something), the
    statistics from the test inputs (unit-scale features), and predictors with spread-out outputs
    (so that no argmax, score order or NMS decision hangs on a float rounding)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def set_statistics(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    model.eval()
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
        for layer in (
            model.sem_seg_head.predictor,
            model.roi_heads.box_predictor.cls_score,
            model.roi_heads.mask_head.predictor,
        ):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
        fast, model.fast_inference = model.fast_inference, False  # the hooks sit on these norms
        model(_inputs())  # padded as the test inputs are
        model.fast_inference = fast  # rebuilt from the new statistics at the next call
        for hook in hooks:
            hook.remove()
    return model


# The model's own modules at inference, not the fused copy that MODEL.EFFICIENTPS.FAST_INFERENCE
# (on by default) runs.
PLAIN = ["MODEL.EFFICIENTPS.FAST_INFERENCE", False]


def _tiny_model(opts=()):
    torch.manual_seed(0)
    return _randomize(build_model(tiny_config([*PERMISSIVE, *opts]))).eval()


def _inputs(seed=3):
    return [
        {"image": training_input(97, 131, [], [], seed=seed)["image"]},
        {
            "image": training_input(80, 96, [], [], seed=seed + 1)["image"],
            "height": 60,
            "width": 72,
        },
    ]


def _assert_same_panoptic(a, b, atol=1e-4):
    """Same outputs up to float rounding. Folding BN reorders float32 sums through ~100 layers, so
    logits drift by ~1e-4 of their scale and a near-tie pixel may flip its argmax: the panoptic
    maps must agree on all but a sliver of pixels, with the same segments."""
    scale = max(a["sem_seg"].abs().max().item(), 1.0)
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=atol * 10 * scale, rtol=0)
    ia, ib = a["instances"], b["instances"]
    assert len(ia) == len(ib)
    assert torch.equal(ia.pred_classes, ib.pred_classes)
    torch.testing.assert_close(ia.scores, ib.scores, atol=atol * 10, rtol=1e-3)
    torch.testing.assert_close(ia.pred_boxes.tensor, ib.pred_boxes.tensor, atol=1e-2, rtol=1e-3)
    pa, pb = a["panoptic_seg"][0], b["panoptic_seg"][0]
    assert (pa != pb).float().mean().item() <= 0.005
    info_a, info_b = a["panoptic_seg"][1], b["panoptic_seg"][1]
    key = ("id", "isthing", "category_id")
    assert [[s[k] for k in key] for s in info_a] == [[s[k] for k in key] for s in info_b]
    for sa, sb in zip(info_a, info_b):
        assert abs(sa["area"] - sb["area"]) <= max(2, 0.02 * sa["area"])


# -------------------------------------------------------------------------------------------------
# The fused copy of the network (MODEL.EFFICIENTPS.FAST_INFERENCE)
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_inference_gives_the_plain_panoptic_output(channels_last):
    model = _tiny_model(["MODEL.EFFICIENTPS.CHANNELS_LAST", channels_last, *PLAIN])
    inputs = _inputs()
    with torch.no_grad():
        plain = model(inputs)
        assert "_inference_copy" not in model.__dict__  # the model's own modules ran
        model.fast_inference = True
        fast = model(inputs)
    network = model._inference_network()
    # Every BN folded, and every conv + LeakyReLU fused (those of the trunk, FPN and heads).
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert sum(isinstance(m, ConvLeakyReLU) for m in network.modules()) > 80
    assert all(not p.requires_grad for p in network.parameters())
    for a, b in zip(plain, fast):
        assert len(a["instances"]) > 0 and any(s["isthing"] for s in a["panoptic_seg"][1])
        assert any(not s["isthing"] for s in a["panoptic_seg"][1])
        _assert_same_panoptic(a, b)


def test_fast_inference_by_default_without_detections():
    model = _tiny_model()
    assert model.fast_inference  # MODEL.EFFICIENTPS.FAST_INFERENCE defaults to True
    model.roi_heads.box_predictor.test_score_thresh = 1.1  # no detection: empty mask-head batch
    with torch.no_grad():
        (out,) = model(_inputs()[:1])
    assert len(out["instances"]) == 0
    assert all(not s["isthing"] for s in out["panoptic_seg"][1])


def test_fused_copy_follows_weight_changes_and_is_not_saved():
    model = _tiny_model(["MODEL.EFFICIENTPS.FAST_INFERENCE", True])
    keys = set(model.state_dict())
    inputs = _inputs()[:1]
    with torch.no_grad():
        model(inputs)
        first = model._inference_network()
        assert model._inference_network() is first  # cached while the weights stay
        assert set(model.state_dict()) == keys  # the copy is no submodule

        other = _randomize(build_model(tiny_config(PERMISSIVE)), seed=1)
        model.load_state_dict(other.state_dict())  # as DetectionCheckpointer does
        fast = model(inputs)[0]
        assert model._inference_network() is not first
        model.fast_inference = False
        plain = model(inputs)[0]
    _assert_same_panoptic(plain, fast)

    model.fast_inference = True
    model.train()
    assert "_inference_copy" not in model.__dict__  # training drops the copy


def test_deep_copies_and_saved_models_leave_the_caches_behind():
    """A deep copy (EMA, SWA, the benchmark's variants) or torch.save(model) carries the weights,
    not the inference copy built from them: it rebuilds its own, with the same output."""
    model = _tiny_model()
    inputs = _inputs()[:1]
    saved = io.BytesIO()
    torch.save(model, saved)
    with torch.no_grad():
        out = model(inputs)[0]
    first = model._inference_network()
    again = io.BytesIO()
    torch.save(model, again)
    assert again.tell() <= 1.01 * saved.tell()  # no second set of weights
    twin = copy.deepcopy(model)
    assert not {"_inference_copy", "_weight_tensor_list"} & set(twin.__dict__)
    assert model._inference_network() is first  # the original keeps its copy
    with torch.no_grad():
        _assert_same_panoptic(out, twin(inputs)[0])
        again.seek(0)
        _assert_same_panoptic(out, torch.load(again, weights_only=False)(inputs)[0])


def test_copy_follows_replaced_tensors():
    """The weight list behind the copy's signature is listed once, and again after whatever may
    replace tensors: load_state_dict(assign=True), conversions, train()/eval()."""
    model = _tiny_model(["MODEL.EFFICIENTPS.FAST_INFERENCE", True])
    inputs = _inputs()[:1]
    with torch.no_grad():
        model(inputs)
        first = model._inference_network()
        other = _randomize(build_model(tiny_config(PERMISSIVE)), seed=1)
        model.load_state_dict(other.state_dict(), assign=True)  # new tensor objects
        weights = {id(t) for t in model._weight_tensors()}
        assert weights == {id(t) for t in (*model.parameters(), *model.buffers())}
        fast = model(inputs)[0]
        assert model._inference_network() is not first
        model.fast_inference = False
        plain = model(inputs)[0]
    _assert_same_panoptic(plain, fast)
    listed = model._weight_tensors()
    model.float()
    assert model._weight_tensors() is not listed


def test_fast_inference_under_inference_mode_and_tta_contract():
    model = _tiny_model(["MODEL.EFFICIENTPS.FAST_INFERENCE", True])
    with torch.inference_mode():  # the copy is built from ordinary tensors all the same
        sem, detections, sizes = model.inference(_inputs()[:1], do_postprocess=False)
    assert sem.shape[-2:] == (128, 160) and sizes == [(97, 131)] and len(detections[0]) > 0
    out = model.postprocess(sem[0].clone(), detections[0], sizes[0])
    assert out["panoptic_seg"][0].shape == (97, 131)


def test_fuse_for_inference_on_detectron2_convs_and_torchvision_blocks():
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.running_mean.uniform_(-1, 1)
    frozen.running_var.uniform_(0.5, 2)
    frozen.weight.uniform_(0.5, 2)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    model = nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=frozen, activation=nn.LeakyReLU(0.1)),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), bn),
        nn.LeakyReLU(0.01),
        Conv2d(8, 4, 1, activation=F.relu),  # a functional activation stays as it is
    ).eval()
    x = torch.randn(2, 3, 17, 23)
    expected = model(x)
    fused = fuse_for_inference(copy.deepcopy(model))
    assert isinstance(fused[0], ConvLeakyReLU) and fused[0].negative_slope == 0.1
    assert isinstance(fused[1][1], nn.Identity) and isinstance(fused[3], Conv2d)
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    assert fused(x).is_contiguous(memory_format=torch.channels_last)

    # The steps one by one, and again without effect.
    plain = copy.deepcopy(model)
    assert fold_batch_norms(plain) == 2 and fold_batch_norms(plain) == 0
    assert fuse_conv_leaky_relu(plain) == 1 and fuse_conv_leaky_relu(plain) == 0
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_folding_keeps_a_conv_bias_and_an_inplace_abn_activation():
    """A conv with its own bias before a BatchNorm, and an InPlaceABN (norm + LeakyReLU in one
    module) after a conv in an nn.Sequential: folded, the norm is gone and the outputs stay."""
    torch.manual_seed(0)
    norms = [nn.BatchNorm2d(8), InPlaceABN(8, negative_slope=0.2)]
    for norm in norms:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    conv.bias.data.uniform_(-1, 1)
    model = nn.Sequential(conv, norms[0], nn.Conv2d(8, 8, 1, bias=False), norms[1]).eval()
    x = torch.randn(2, 3, 9, 11)
    expected = model(x)
    assert (expected < 0).any()  # the LeakyReLU's negative side is exercised
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == 2
    assert type(folded[1]) is nn.Identity
    assert type(folded[3]) is nn.LeakyReLU and folded[3].negative_slope == 0.2
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_convs_the_fused_kernel_cannot_pad_stay_unfused():
    """The fused kernel pads with numbers of zeros: a reflect- or "same"-padded conv before a
    LeakyReLU keeps its own padding (fusing it would fail, or pad with zeros), and the model
    still fuses the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.LeakyReLU(0.1),
        Conv2d(4, 4, 3, padding="same", activation=nn.LeakyReLU(0.2)),
        Conv2d(4, 4, 3, padding=1, activation=nn.LeakyReLU(0.3)),
    ).eval()
    x = torch.randn(1, 3, 9, 11)
    expected = model(x)
    fused = fuse_for_inference(copy.deepcopy(model))
    assert [type(m) for m in fused] == [nn.Conv2d, nn.LeakyReLU, Conv2d, ConvLeakyReLU]
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="zero padding"):
        ConvLeakyReLU(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 0.1)


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, dilation, groups",
    [(8, 16, 1, 1, 1, 1), (16, 16, 3, 2, 1, 16), (12, 12, 3, 1, (1, 6), 12), (6, 4, 5, 1, 1, 2)],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_leaky_relu_equals_conv_then_activation(
    in_channels, out_channels, kernel, stride, dilation, groups, channels_last
):
    torch.manual_seed(0)
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    padding = tuple(kernel // 2 * v for v in d)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, d, groups)
    x = torch.randn(3, in_channels, 19, 26)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fused = ConvLeakyReLU(conv, 0.01)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.leaky_relu(conv(x), 0.01), atol=1e-5, rtol=1e-5)
        assert fused(x[:0]).shape == (0, out_channels, *conv(x).shape[-2:])
    # With autograd it is the unfused pair, so it can be differentiated.
    x.requires_grad_(True)
    fused(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_detectron2s_flop_count_traces_the_fast_inference_model():
    """Detectron2's FlopCountAnalysis traces the model with torch.jit.trace, which stopped at the
    fused oneDNN kernel of the default fast path ("unsupported input list type: Scalar?"); under
    tracing the copy runs the conv and the activation apart, as fvcore counts them."""
    from detectron2.utils.analysis import FlopCountAnalysis

    model = _tiny_model()
    inputs = [{"image": training_input(64, 96, [], [])["image"]}]
    fast = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).by_operator()
    model.fast_inference = False  # the model's own modules: the same convs, BatchNorm apart
    plain = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).by_operator()
    assert fast["conv"] == plain["conv"] > 0 and "batch_norm" not in fast


# -------------------------------------------------------------------------------------------------
# The inference network: dtype, CUDA graphs, torch.compile (efficientps_d2.modeling.fast_inference)
# -------------------------------------------------------------------------------------------------


def _with_options(model, **changes):
    model.inference_options = dataclasses.replace(model.inference_options, **changes)
    return model


def test_dense_network_contract():
    model = _with_options(_tiny_model(), dtype="bfloat16")
    network = model._inference_network()
    assert network.dense_network.dtype == torch.bfloat16
    with torch.no_grad():
        features, sem, objectness, proposals = network.dense(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        f"p{i}": (2, 32, 64 // 2**i, 96 // 2**i) for i in (2, 3, 4, 5)
    }
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in features.values())
    assert sem.shape == (2, 5, 64, 96) and sem.dtype == torch.float32
    anchors = [3 * (64 // 2**i) * (96 // 2**i) for i in (2, 3, 4, 5)]  # 3 aspect ratios
    top = [min(a, model.proposal_generator.pre_nms_topk[False]) for a in anchors]
    assert top != anchors  # the largest levels are cut to the pre-NMS top-k
    assert [tuple(x.shape) for x in objectness] == [(2, k) for k in top]
    assert [tuple(x.shape) for x in proposals] == [(2, k, 4) for k in top]
    assert all(bool((x[:, :-1] >= x[:, 1:]).all()) for x in objectness)  # highest first
    assert all(x.dtype == torch.float32 for x in objectness + proposals)
    # Only the copy was cast: the model's own weights and anchors stay float32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


def test_inference_network_steps_equal_detectron2s_rpn_and_roi_heads():
    """rpn_proposals and InferenceNetwork.detect stand in for RPN.forward and
    StandardROIHeads.forward in inference: same proposals, same detections and masks."""
    model = _tiny_model(PLAIN)
    network = model._inference_network()
    with torch.inference_mode():
        images = model.preprocess_image(_inputs())
        features, _, objectness, proposal_boxes = network.dense(images.tensor)
        proposals = rpn_proposals(model.proposal_generator, images, objectness, proposal_boxes)
        expected_proposals, _ = model.proposal_generator(images, features)
        detections = network.detect(model.roi_heads, features, proposals)
        expected, _ = model.roi_heads(images, features, expected_proposals)
    for a, b in zip(proposals, expected_proposals):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
    for a, b in zip(detections, expected):
        assert len(a) > 0
        _assert_equal_instances(a, b)


def _assert_equal_instances(a, b):
    """The same fields, each equal bit for bit (Boxes by their tensors)."""
    assert a.get_fields().keys() == b.get_fields().keys()
    for name in b.get_fields():
        x, y = a.get(name), b.get(name)
        x, y = (x.tensor, y.tensor) if hasattr(x, "tensor") else (x, y)
        assert torch.equal(x, y), name


def _rpn_outputs(seed, images, counts):
    """Random objectness logits and decoded boxes of ``images`` images, one tensor per level with
    ``counts`` anchors each, with what ``find_top_rpn_proposals`` has to handle: tied scores, boxes
    outside the image or too small once clipped, and non-finite boxes and scores."""
    generator = torch.Generator().manual_seed(seed)
    objectness, proposals = [], []
    for count in counts:
        logits = torch.randn(images, count, generator=generator).round(decimals=1)  # ties
        xy = torch.rand(images, count, 2, generator=generator) * 140 - 20
        wh = torch.rand(images, count, 2, generator=generator) * 40
        wh[:, ::7] = 0.5  # too small
        boxes = torch.cat([xy, xy + wh], dim=2)
        boxes[:, 3::50, 1] = float("nan")
        boxes[:, 5::60, 2] = float("inf")
        logits[:, 11::70] = float("-inf")
        objectness.append(logits)
        proposals.append(boxes)
    return objectness, proposals


@pytest.mark.parametrize(
    "sizes, counts, pre_nms_topk",
    [
        ([(100, 120)], [3000, 2000, 800], 1000),  # over 1000 boxes: torchvision NMS per level
        ([(100, 120), (64, 90), (100, 120)], [600, 150, 40], 200),  # its coordinate trick
    ],
    ids=["one-image", "three-images"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_rpn_proposals_equal_find_top_rpn_proposals(sizes, counts, pre_nms_topk, device):
    """rpn_proposals (batched over images, one host read per image) gives Detectron2's proposals
    bit for bit, with ties, non-finite and too small boxes, for one image and for several of
    different sizes."""
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

    rpn = _tiny_model().proposal_generator
    rpn.pre_nms_topk = {False: pre_nms_topk, True: pre_nms_topk}
    rpn.post_nms_topk = {False: 300, True: 300}
    rpn.min_box_size = 1.0
    objectness, proposals = _rpn_outputs(0, len(sizes), counts)
    objectness = [x.to(device) for x in objectness]
    proposals = [x.to(device) for x in proposals]
    images = ImageList(torch.zeros(len(sizes), 3, 128, 128, device=device), sizes)
    with torch.inference_mode():
        expected = find_top_rpn_proposals(
            [p.clone() for p in proposals],
            objectness,
            sizes,
            rpn.nms_thresh,
            pre_nms_topk,
            300,
            1.0,
            False,
        )
        # As the dense network hands them over: each level's top-k.
        result = rpn_proposals(rpn, images, *top_anchors(objectness, proposals, pre_nms_topk))
    for a, b in zip(result, expected):
        assert a.image_size == b.image_size and len(b) > 0
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)


def _boxes_over_levels(generator, count, height, width):
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    wh = torch.rand(count, 2, generator=generator) ** 3 * 400 + 0.5  # over all levels
    return Boxes(torch.cat([xy, xy + wh], dim=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [0, 1, 400])
def test_batched_nms_on_a_gpu_is_torchvisions(count, device):
    """batched_nms's GPU branch (also run on the CPU) keeps torchvision's boxes, in its order:
    its coordinate trick, the shift's 1 added as a number instead of a tensor copied over."""
    from torchvision.ops.boxes import _batched_nms_coordinate_trick

    generator = torch.Generator().manual_seed(3)
    boxes = _boxes_over_levels(generator, count, 64, 96).tensor.to(device)
    scores = torch.rand(count, generator=generator).round(decimals=2).to(device)  # ties
    classes = torch.randint(0, 5, (count,), generator=generator).to(device)
    expected = _batched_nms_coordinate_trick(boxes, scores, classes, 0.5)
    kept = batched_nms(boxes, scores, classes, 0.5, device_type="cuda")
    assert torch.equal(kept, expected) and kept.dtype == torch.int64
    # On its own device: torchvision's (CPU), or the GPU branch.
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts", [[70], [40, 0, 25]], ids=["one-image", "three-images"])
def test_pool_rois_equal_roi_pooler(counts, device):
    """pool_rois (boxes sorted by level, one host read) and pool_rois_fixed (every level pools
    every row, those of other levels as empty boxes; each image's rows padded) pool the rows of
    Detectron2's ROIPooler bit for bit, through the model's ThreadedROIAlign levels, images
    without boxes included."""
    from efficientps_d2.modeling.fast_inference import _padded_rois, _unpadded

    model = _tiny_model().to(device)
    pooler = model.roi_heads.box_pooler
    generator = torch.Generator().manual_seed(0)
    features = [
        torch.randn(len(counts), 8, 64 // 2**i, 96 // 2**i, generator=generator).to(device)
        for i in range(4)
    ]
    box_lists = [_boxes_over_levels(generator, count, 64, 96).to(device) for count in counts]
    rows = 80  # each image's rows padded to
    with torch.inference_mode():
        expected = pooler(features, box_lists)
        pooled = pool_rois(pooler, features, box_lists)
        padded = pool_rois_fixed(
            pooler, features, _padded_rois([b.tensor for b in box_lists], rows)
        )
    assert expected.shape[0] == sum(counts) and torch.equal(pooled, expected)
    assert padded.shape == (len(counts) * rows, *expected.shape[1:])
    assert torch.equal(torch.cat(_unpadded(padded, counts, rows)), expected)


@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "class-agnostic"])
@pytest.mark.parametrize(
    "counts", [[300], [120, 0, 90], [0]], ids=["one-image", "three-images", "no-proposals"]
)
@pytest.mark.parametrize("device", DEVICES)
def test_box_detections_equal_fast_rcnn_inference(counts, agnostic, device):
    """box_detections gives FastRCNNOutputLayers.inference's detections bit for bit: rows with a
    box or score not finite dropped, boxes clipped to their image, per-class NMS, top-k."""
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers

    model = _tiny_model()
    predictor = model.roi_heads.box_predictor
    classes = predictor.num_classes
    if agnostic:
        predictor = FastRCNNOutputLayers(
            ShapeSpec(channels=8),
            box2box_transform=predictor.box2box_transform,
            num_classes=classes,
            cls_agnostic_bbox_reg=True,
            test_score_thresh=0.05,
            test_topk_per_image=30,
        ).eval()
    generator = torch.Generator().manual_seed(1)
    sizes = [(64, 96), (50, 70), (64, 96)][: len(counts)]
    proposals = []
    for (height, width), count in zip(sizes, counts):
        proposal = Instances((height, width))
        proposal.proposal_boxes = _boxes_over_levels(generator, count, height, width).to(device)
        proposals.append(proposal)
    rows = sum(counts)
    scores = (torch.randn(rows, classes + 1, generator=generator) * 2).round(decimals=1)  # ties
    deltas = torch.randn(rows, 4 * (1 if agnostic else classes), generator=generator)
    scores[7::40, 1] = float("nan")
    deltas[11::50, 0] = float("inf")
    deltas[13::50, 2] = float("nan")
    predictor, scores, deltas = predictor.to(device), scores.to(device), deltas.to(device)
    with torch.inference_mode():
        expected, _ = predictor.inference((scores, deltas), proposals)
        detections = box_detections(predictor, (scores, deltas), proposals)
    assert len(detections) == len(counts)
    assert sum(len(x) for x in expected) > 0 or sum(counts) == 0
    for a, b in zip(detections, expected):
        assert a.image_size == b.image_size
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_box_detections_decode_with_any_transform():
    """Box transforms other than Box2BoxTransform (here Detectron2's Box2BoxTransformLinear,
    which has no weights) decode through their own apply_deltas."""
    from detectron2.modeling.box_regression import Box2BoxTransformLinear

    from efficientps_d2.modeling.fast_inference import _decode_boxes

    generator = torch.Generator().manual_seed(4)
    boxes = _boxes_over_levels(generator, 6, 64, 96).tensor
    deltas = torch.rand(6, 4, generator=generator)
    transform = Box2BoxTransformLinear()
    expected = transform.apply_deltas(deltas, boxes).view(6, 1, 4)
    assert torch.equal(_decode_boxes(transform, deltas, boxes), expected)


@pytest.mark.parametrize("counts", [[5], [3, 0, 4]], ids=["one-image", "three-images"])
def test_mask_head_probabilities_are_mask_rcnn_inferences(counts):
    """The mask head sets Detectron2's pred_masks itself, from the logits it keeps: the values
    of Detectron2's mask_rcnn_inference."""
    from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference

    head = _tiny_model().roi_heads.mask_head
    classes = head.predictor.out_channels
    assert classes > 1  # class-specific masks, picked by class
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), 32, 14, 14, generator=generator)
    instances = []
    for count in counts:
        inst = Instances((64, 96))
        inst.pred_classes = torch.randint(0, classes, (count,), generator=generator)
        instances.append(inst)
    expected = [Instances((64, 96), pred_classes=i.pred_classes) for i in instances]
    with torch.inference_mode():
        head(x, instances)
        logits = head.layers(x)
        mask_rcnn_inference(logits, expected)
    picked = logits[torch.arange(len(logits)), torch.cat([i.pred_classes for i in instances])]
    for inst, ref, own in zip(instances, expected, picked.split(counts)):
        assert torch.equal(inst.pred_masks, ref.pred_masks)
        assert torch.equal(inst.pred_mask_logits, own[:, None])


def _spy_on_roi_parts(monkeypatch):
    """Records, for each split ROIAlign call, which one ("pool": forward, "backward_part"), its
    part bounds and the threads that ran its parts."""
    calls = []
    run_parts = threaded_roi_align._run_parts

    def spy(fn, bounds):
        threads = set()

        def recorded(*span):
            threads.add(threading.get_ident())
            return fn(*span)

        calls.append((fn.__name__, list(bounds), threads))
        return run_parts(recorded, bounds)

    monkeypatch.setattr(threaded_roi_align, "_run_parts", spy)
    return calls


def _random_boxes(counts, g):
    boxes = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([150.0, 100.0])
        wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([120.0, 90.0]) + 1
        boxes.append(Boxes(torch.cat([xy, xy + wh], dim=1)))
    return boxes


@pytest.mark.parametrize(
    "counts, pooler_type, sampling_ratio, split",
    [
        ((37,), "ROIAlignV2", 0, {"pool"}),  # one image: the backward is one part
        ((0, 13, 0, 7, 0), "ROIAlign", 2, {"pool", "backward_part"}),
        ((3, 0), "ROIAlignV2", 0, set()),  # too few ROIs to split
    ],
)
def test_threaded_roi_align_equals_detectron2s(
    monkeypatch, counts, pooler_type, sampling_ratio, split
):
    """Detectron2's ROIPooler with ThreadedROIAlign levels (thread_roi_poolers) over 3 levels:
    the one call's rows and gradients bit for bit, in training and in inference mode, on 2
    threads or 1, for one image and for batches whose images have different box counts (some
    none, some fewer than a split needs); aligned and sampling ratio kept."""
    monkeypatch.setattr(threaded_roi_align, "MIN_ROIS_PER_THREAD", 2)
    calls = _spy_on_roi_parts(monkeypatch)
    g = torch.Generator().manual_seed(0)
    reference = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16), sampling_ratio, pooler_type)
    heads = nn.Module()
    heads.box_pooler = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16), sampling_ratio, pooler_type)
    assert thread_roi_poolers(heads) == 3
    for ours, theirs in zip(heads.box_pooler.level_poolers, reference.level_poolers):
        settings = ("output_size", "spatial_scale", "sampling_ratio", "aligned")
        assert type(ours) is ThreadedROIAlign
        assert [getattr(ours, a) for a in settings] == [getattr(theirs, a) for a in settings]
    features = [
        torch.randn(len(counts), 8, 32 // s, 48 // s, generator=g).contiguous(
            memory_format=torch.channels_last if s == 1 else torch.contiguous_format
        )
        for s in (1, 2, 4)
    ]
    boxes = _random_boxes(counts, g)
    upstream = torch.randn(sum(counts), 8, 7, 7, generator=g)

    def pool_and_backward(pooler):
        inputs = [x.detach().requires_grad_() for x in features]
        pooled = pooler(inputs, boxes)
        pooled.backward(upstream)
        return pooled.detach(), [x.grad for x in inputs]

    expected, expected_grads = pool_and_backward(reference)
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (2, 1):
            torch.set_num_threads(num_threads)
            results.append(pool_and_backward(heads.box_pooler))
            with torch.inference_mode():
                assert torch.equal(heads.box_pooler(features, boxes), expected)
    finally:
        torch.set_num_threads(threads)
    for pooled, grads in results:
        assert torch.equal(pooled, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    on_two_threads = {name for name, bounds, used in calls if len(bounds) > 2 and len(used) == 2}
    assert on_two_threads == split


def test_backward_parts_split_between_images():
    """image_parts moves each inner bound of roi_parts to the nearest first ROI of an image; one
    part for a single image or ROIs not sorted by image."""
    images = torch.tensor([0, 0, 0, 0, 0, 1, 1, 3], dtype=torch.float32)
    rois = torch.cat([images[:, None], torch.zeros(8, 4)], dim=1)
    assert image_parts(rois, [0, 4, 8]) == [0, 5, 8]
    assert image_parts(rois, [0, 8]) == [0, 8]
    assert image_parts(rois[:5], [0, 2, 5]) == [0, 5]
    assert image_parts(rois.flip(0), [0, 4, 8]) == [0, 8]


def test_threaded_roi_align_runs_detectron2s_op_where_it_does_not_split(monkeypatch):
    """No split for fewer than 2 * MIN_ROIS_PER_THREAD ROIs, half precision or under torch.jit
    tracing (which records only the calling thread): the trace holds torchvision's op."""
    calls = _spy_on_roi_parts(monkeypatch)
    roi_align = ThreadedROIAlign((7, 7), 1 / 4, 0, True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 32, 48, generator=g)
    rois = torch.cat([torch.zeros(40, 1), _random_boxes([40], g)[0].tensor], dim=1)
    expected = ROIAlign((7, 7), 1 / 4, 0, True)(x, rois)
    assert torch.equal(roi_align(x, rois), expected) and len(calls) == 1
    assert torch.equal(roi_align(x, rois[:31]), expected[:31]) and len(calls) == 1
    half = roi_align(x.half(), rois)
    assert half.dtype == torch.float16 and len(calls) == 1
    traced = torch.jit.trace(roi_align, (x, rois), check_trace=False)
    assert len(calls) == 1 and "roi_align" in str(traced.graph)
    assert torch.equal(traced(x, rois), expected)


def test_training_step_pools_on_two_threads(monkeypatch):
    """EfficientPS's box and mask poolers are threaded (thread_roi_poolers, at model build): a
    training step on two threads gives Detectron2's poolers' losses and gradients, bit for bit."""
    monkeypatch.setattr(threaded_roi_align, "MIN_ROIS_PER_THREAD", 4)
    calls = _spy_on_roi_parts(monkeypatch)
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    reference = copy.deepcopy(model)
    for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
        assert all(type(level) is ThreadedROIAlign for level in pooler.level_poolers)
    for pooler in (reference.roi_heads.box_pooler, reference.roi_heads.mask_pooler):
        for i, level in enumerate(pooler.level_poolers):
            pooler.level_poolers[i] = ROIAlign(
                level.output_size, level.spatial_scale, level.sampling_ratio, level.aligned
            )
    results = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for net in (model, reference):
            with EventStorage():
                torch.manual_seed(1)
                losses = net(_training_batch())
            sum(losses.values()).backward()
            grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
            results.append(({k: v.detach() for k, v in losses.items()}, grads))
    finally:
        torch.set_num_threads(threads)
    (losses, grads), (expected_losses, expected_grads) = results
    assert losses.keys() == expected_losses.keys()
    assert all(torch.equal(losses[k], expected_losses[k]) for k in losses)
    assert grads.keys() == expected_grads.keys() and any("backbone" in n for n in grads)
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)
    on_two_threads = {name for name, bounds, used in calls if len(bounds) > 2 and len(used) == 2}
    assert on_two_threads == {"pool", "backward_part"}


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsampled_sums_under_cuda_autocast_stay_float32(dtype):
    """CUDA autocast runs nearest upsampling in float32, so the top-down sum of a half-precision
    lateral and its upsampled coarser level is float32: add_upsampled_into must not round it to
    the lateral's dtype in place."""
    x = torch.randn(1, 8, 16, 24, device="cuda", dtype=dtype)
    coarse = torch.randn(1, 8, 8, 12, device="cuda", dtype=dtype)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        expected = x + F.interpolate(coarse, size=(16, 24), mode="nearest")
        got = add_upsampled_into(x.clone(), coarse)
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


def test_bfloat16_inference_is_as_close_to_float32_as_autocast():
    """bfloat16 rounds every layer's output (~0.4%); through this random, untrained B0 the
    relative error grows to several percent, so the sound bound is torch.autocast's own error on
    the same network, not a fixed number; and the semantic argmax agrees on most pixels."""
    model = _tiny_model(PLAIN)
    x = torch.stack([model.preprocess_image([i]).tensor[0, :, :80, :96] for i in _inputs()[1:]])
    with torch.no_grad():
        reference = model._inference_network().dense(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model._inference_network().dense(x)
        outputs = _with_options(model, dtype="bfloat16")._inference_network().dense(x)

    def error(a, b):
        return ((a - b).norm() / a.norm()).item()

    for name in reference[0]:
        bound = 1.5 * error(reference[0][name], autocast[0][name]) + 1e-3
        assert error(reference[0][name], outputs[0][name]) <= bound, name
    assert error(reference[1], outputs[1]) <= 1.5 * error(reference[1], autocast[1]) + 1e-3
    agree = (reference[1].argmax(1) == outputs[1].argmax(1)).float().mean().item()
    assert agree >= 0.75

    with torch.no_grad():
        out = model(_inputs())  # the whole model runs in bfloat16 and fuses as usual
    assert all(o["sem_seg"].dtype == torch.float32 for o in out)
    assert all(o["instances"].pred_mask_logits.dtype == torch.float32 for o in out)


def test_inference_dtype_set_on_the_model_takes_effect_and_is_checked():
    """``model.inference_dtype`` (what the exporter's warning names, beside the config key) was a
    plain attribute that inference never read: setting it changed nothing, silently."""
    model = _tiny_model()
    model.inference_dtype = "bfloat16"
    assert model.inference_options.dtype == "bfloat16"
    assert model._inference_network().dense_network.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="INFERENCE_DTYPE must be one of .* got 'fp16'"):
        model.inference_dtype = "fp16"
    assert model.inference_dtype == "bfloat16"
    # Without the fused copy too: the cast is a copy's, the model's own weights stay float32.
    model = _with_options(_tiny_model(PLAIN), dtype="bfloat16")
    assert model._inference_network().dense_network.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())


class _OffDevice(TorchDispatchMode):
    """Records the operators that read or make a tensor on another device than ``device``."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = torch.utils._pytree.tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.device != self.device for t in tensors):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize(
    "changes", [{}, {"fast_inference": False}, {"dtype": "bfloat16"}], ids=["fast", "plain", "bf16"]
)
def test_dense_network_never_waits_for_the_device(changes):
    """What capturing it as a CUDA graph needs, and what lets a replay run ahead of the GPU: the
    dense network neither reads the device nor makes tensors from host data (counted on the CPU,
    as for the fusion)."""
    model = _with_options(_tiny_model(), **changes)
    network = model._inference_network()
    images = model.preprocess_image(_inputs()).tensor
    with torch.inference_mode(), DeviceReads() as reads:  # as EfficientPS.inference runs it
        network.dense(images)
    assert not reads.counts
    # Nor does it make a tensor on the host and copy it over (on a GPU, a copy that waits; a
    # capture fails on it): on the meta device, any host tensor shows.
    network, images = model.to("meta")._inference_network(), images.to("meta")
    with torch.inference_mode(), _OffDevice("meta") as off_device:
        proposals = network.dense(images)[-1]
    assert off_device.ops == [] and proposals[0].device.type == "meta"


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_dense_network_anchors_are_detectron2s(offset):
    model = _tiny_model(["MODEL.ANCHOR_GENERATOR.OFFSET", offset])
    generator = model.proposal_generator.anchor_generator
    network = model._inference_network().dense_network
    feature_maps = [torch.zeros(1, 8, h, w) for h, w in ((25, 33), (13, 17), (7, 9), (4, 5))]
    expected = generator(feature_maps)
    anchors = network.anchors(feature_maps)
    assert [a.tensor.shape for a in anchors] == [e.tensor.shape for e in expected]
    assert all(torch.equal(a.tensor, e.tensor) for a, e in zip(anchors, expected))


def test_dense_network_runs_another_anchor_generator_itself():
    model = _tiny_model()

    class Jittered(DefaultAnchorGenerator):
        pass

    generator = model.proposal_generator.anchor_generator
    jittered = Jittered(sizes=[[32]], aspect_ratios=[[1.0]], strides=generator.strides)
    model.proposal_generator.anchor_generator = jittered
    feature_maps = [torch.zeros(1, 8, 6, 7)] * 4
    anchors = model._inference_network().dense_network.anchors(feature_maps)
    assert len(anchors[0]) == 6 * 7  # one cell anchor: the subclass's own, not the model's three
    assert all(torch.equal(a.tensor, e.tensor) for a, e in zip(anchors, jittered(feature_maps)))


@pytest.mark.parametrize("fast_inference", [True, False], ids=["fast", "plain"])
def test_compiled_dense_network_equals_eager(monkeypatch, fast_inference):
    """The COMPILE path end to end. Inductor takes minutes to compile even a B0 on two CPU cores,
    so torch.compile runs with the "eager" backend here. Dynamo traces the whole dense network as
    one graph (fullgraph: a graph break would split COMPILE_MODE reduce-overhead's CUDA graphs)
    and the outputs are the eager ones."""
    model = _tiny_model([] if fast_inference else PLAIN)
    inputs = _inputs()
    with torch.no_grad():
        eager = model(inputs)
    compile_calls = []
    real_compile = torch.compile

    def compile_eager(module, **kwargs):
        compile_calls.append(kwargs)
        return real_compile(module, **{**kwargs, "backend": "eager", "fullgraph": True})

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = _with_options(model, compile=True, compile_mode="max-autotune")(inputs)
    assert compile_calls == [{"mode": "max-autotune", "dynamic": False}]
    assert model._inference_network().compiled is not None
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-5, rtol=1e-5)
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    torch._dynamo.reset()


def test_compiled_graph_replays_do_not_overwrite_the_last_images_output(monkeypatch):
    """COMPILE_MODE reduce-overhead replays CUDA graphs (CUDA graph trees): on CUDA each call's
    outputs live in a pool that the next call overwrites. Stood in for here by a compiled network
    that writes every call's outputs into the same tensors: the "sem_seg" a caller keeps (a
    video's frames, a list of predictions) must stay the one of its own image."""
    model = _tiny_model()
    first, second = ({"image": training_input(64, 96, [], [], seed=s)["image"]} for s in (3, 8))
    with torch.no_grad():
        expected = model([first])[0]["sem_seg"]

    def compile_into_static_outputs(module, **kwargs):
        assert kwargs["mode"] == "reduce-overhead"
        static = []

        def replay(images):
            outputs, spec = torch.utils._pytree.tree_flatten(module(images))
            if not static:
                static.extend(outputs)
            else:
                for buffer, value in zip(static, outputs):
                    buffer.copy_(value)
            return torch.utils._pytree.tree_unflatten(static, spec)

        return replay

    monkeypatch.setattr(torch, "compile", compile_into_static_outputs)
    _with_options(model, compile=True, compile_mode="reduce-overhead")
    with torch.no_grad():
        kept = model([first])[0]["sem_seg"]
        model([second])
    torch.testing.assert_close(kept, expected)


def test_a_dropped_inference_copy_is_freed_at_once():
    """The inference copy (on CUDA with its CUDA graphs' memory pools, gigabytes at 1024x2048)
    is freed as soon as the model drops it (train(), new weights, new options), not whenever
    Python's cycle collector next runs: nothing in it refers back to it."""
    model = _tiny_model()
    network = weakref.ref(model._inference_network())
    gc.disable()
    try:
        model.train()
        assert network() is None
    finally:
        gc.enable()


def test_inference_refuses_a_proposal_generator_it_does_not_run():
    """The inference network runs Detectron2's RPN steps itself: another proposal generator
    (a subclass included) is refused, naming the key, rather than silently replaced by them."""

    class MyRPN(RPN):
        pass

    model = _tiny_model(PLAIN)
    model.proposal_generator.__class__ = MyRPN
    with pytest.raises(NotImplementedError, match="MODEL.PROPOSAL_GENERATOR.NAME 'RPN'.*MyRPN"):
        model(_inputs()[:1])


def test_cuda_graph_off_cuda_runs_the_model_itself():
    model = _with_options(_tiny_model(PLAIN), cuda_graph=True)
    network = model._inference_network()
    assert not network.cuda_graph and network.dense_network.backbone is model.backbone
    assert "_inference_copy" not in model.__dict__


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("INFERENCE_DTYPE", "float64", "INFERENCE_DTYPE"),
        ("CUDA_GRAPH_CACHE_SIZE", 0, "CUDA_GRAPH_CACHE_SIZE"),
        (
            "CUDA_GRAPH_ROI_HEADS",
            True,
            "CUDA_GRAPH_ROI_HEADS .* needs MODEL.EFFICIENTPS.CUDA_GRAPH",
        ),
        ("COMPILE", True, "CUDA_GRAPH and MODEL.EFFICIENTPS.COMPILE"),
        # torch.compile refused it at the first inference, without the key.
        ("COMPILE_MODE", "fast", r"COMPILE_MODE must be one of .*'reduce-overhead'.*got 'fast'"),
    ],
)
def test_inference_options_are_checked_when_the_model_is_built(key, value, message):
    opts = ["MODEL.EFFICIENTPS.CUDA_GRAPH", key == "COMPILE", f"MODEL.EFFICIENTPS.{key}", value]
    opts += ["MODEL.EFFICIENTPS.COMPILE", True] if key == "COMPILE_MODE" else []
    with pytest.raises(ValueError, match=message):
        build_model(tiny_config(opts))


class _Replays:
    """What FixedShapeRoiHeads captures, run as it is: records each stage's row count."""

    def __init__(self, fn, *examples):
        self.fn = fn
        self.rows = [len(x) for x in examples]
        self.calls = 0

    def __call__(self, *inputs):
        assert [len(x) for x in inputs] == self.rows  # the shapes it was captured for
        self.calls += 1
        return self.fn(*inputs)


@pytest.mark.parametrize("fast_inference", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("post_nms_topk", [1000, 20], ids=["padded", "full"])
def test_fixed_shape_roi_heads_equal_inference_network_detect(fast_inference, post_nms_topk):
    """The ROI heads at fixed row counts (MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS), run here without
    a graph: each image's proposals padded to the post-NMS top-k, its detections to the
    detections per image, the same detections and masks as InferenceNetwork.detect (bit for bit
    on the CPU), each stage captured once for its row count."""
    model = _tiny_model(["MODEL.RPN.POST_NMS_TOPK_TEST", post_nms_topk])
    _with_options(model, fast_inference=fast_inference)
    network = model._inference_network()
    captured = {}

    def capture(fn, *examples):
        captured[fn.func.__name__] = _Replays(fn, *examples)
        return captured[fn.func.__name__]

    fixed = FixedShapeRoiHeads(
        network.box_head, network.mask_head, model.proposal_generator, capture=capture
    )
    with torch.inference_mode():
        images = model.preprocess_image(_inputs())
        features, _, objectness, proposal_boxes = network.dense(images.tensor)
        proposals = rpn_proposals(model.proposal_generator, images, objectness, proposal_boxes)
        expected = network.detect(model.roi_heads, features, proposals)
        detections = fixed.detect(model.roi_heads, features, proposals)
        fixed.detect(model.roi_heads, features, proposals)
    counts = [len(p) for p in proposals]
    assert (max(counts) < post_nms_topk) == (post_nms_topk == 1000)
    per_image = model.roi_heads.box_predictor.test_topk_per_image
    assert {k: (v.rows, v.calls) for k, v in captured.items()} == {
        "_box_stage": ([2 * post_nms_topk], 2),
        "_mask_stage": ([2 * per_image], 2),
    }
    for a, b in zip(detections, expected):
        assert 0 < len(b) < per_image
        _assert_equal_instances(a, b)


def test_fixed_shape_roi_heads_leave_other_heads_to_detect():
    """A mask head with its own forward, or no top-k of detections, runs the mask head as it is;
    a box predictor not Detectron2's runs InferenceNetwork.detect's own path (None)."""
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers

    model = _tiny_model()
    network = model._inference_network()
    captured = []

    def capture(fn, *examples):
        captured.append(fn.func.__name__)
        return fn

    fixed = FixedShapeRoiHeads(
        network.box_head, network.mask_head, model.proposal_generator, capture=capture
    )
    with torch.inference_mode():
        images = model.preprocess_image(_inputs()[:1])
        features, _, objectness, proposal_boxes = network.dense(images.tensor)
        proposals = rpn_proposals(model.proposal_generator, images, objectness, proposal_boxes)
        expected = network.detect(model.roi_heads, features, proposals)[0]
        model.roi_heads.box_predictor.test_topk_per_image = -1
        unbounded = fixed.detect(model.roi_heads, features, proposals)[0]
        assert captured == ["_box_stage"]
        model.roi_heads.box_predictor.test_topk_per_image = 100

        class OwnForward(type(network.mask_head)):
            def forward(self, x, instances):
                return super().forward(x, instances)

        network.mask_head.__class__ = OwnForward
        own = fixed.detect(model.roi_heads, features, proposals)[0]
        assert captured == ["_box_stage"]
        model.roi_heads.box_predictor.__class__ = type("Other", (FastRCNNOutputLayers,), {})
        assert fixed.detect(model.roi_heads, features, proposals) is None
    for result in (unbounded, own):
        assert torch.equal(result.pred_mask_logits, expected.pred_mask_logits)
        assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor)


class _StaticOutputs:
    """A CUDA graph's contract, on the CPU: inputs copied into static tensors, and the same output
    tensors overwritten by every replay (which a graph's caller must copy what it keeps from)."""

    def __init__(self, fn, *examples, pool=None):
        self.fn = fn
        self.static_inputs = [x.clone() for x in examples]
        self.static_output = fn(*self.static_inputs)
        self.graph = types.SimpleNamespace(pool=lambda: None)

    def __call__(self, *inputs):
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        fresh, static = self.fn(*self.static_inputs), self.static_output
        leaves = torch.utils._pytree.tree_leaves
        for a, b in zip(leaves(static), leaves(fresh)):
            a.copy_(b)
        return static


def test_graphed_roi_heads_keep_nothing_a_replay_overwrites(monkeypatch):
    """The CUDA graphs' wiring (CUDA_GRAPH_ROI_HEADS), with graphs stood in for on the CPU: the
    ROI heads are graphed on the dense network's graph of each input size, the outputs equal the
    eager ones, and an image's outputs stay as they were when later images replay the graphs."""
    from efficientps_d2.modeling import fast_inference

    monkeypatch.setattr(fast_inference, "_CapturedGraph", _StaticOutputs)
    model = _tiny_model()
    first, other_size = _inputs()
    second = {"image": training_input(97, 131, [], [], seed=9)["image"]}  # first's size
    with torch.no_grad():
        expected = [model([x])[0] for x in (first, second, other_size)]
        _with_options(model, cuda_graph=True, cuda_graph_roi_heads=True)
        network = model._inference_network()
        network.cuda_graph = True  # what build_inference_network sets on CUDA only
        outputs = [
            _graphed(model, [first])[0],
            model([second])[0],  # first's size: its graphs replayed over first's outputs
            _graphed(model, [other_size])[0],
        ]
    for output, reference in zip(outputs, expected):
        assert len(output["instances"]) > 0
        _assert_same_output(output, reference)
    assert len(network.graphs) == 2
    for captured in network.graphs._values.values():
        assert sorted(captured.roi_heads._graphs) == [("boxes", 20), ("masks", 100)]


def _assert_same_output(a, b):
    assert torch.equal(a["sem_seg"], b["sem_seg"])
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    _assert_equal_instances(a["instances"], b["instances"])


def test_size_cache_evicts_least_recently_used():
    built = []

    def capture(key, example):
        built.append(key)
        return (key, example)

    cache = SizeLRUCache(2, capture, build_after=1)
    assert cache.get((1, 3, 64, 96), "a") == ((1, 3, 64, 96), "a")
    cache.get((1, 3, 128, 96), "b")
    assert cache.get((1, 3, 64, 96), "ignored") == ((1, 3, 64, 96), "a")  # cached: not rebuilt
    cache.get((1, 3, 32, 32), "c")  # evicts (1, 3, 128, 96), the least recently used
    assert cache.keys() == [(1, 3, 64, 96), (1, 3, 32, 32)] and len(cache) == 2
    cache.get((1, 3, 128, 96), "d")
    assert built == [(1, 3, 64, 96), (1, 3, 128, 96), (1, 3, 32, 32), (1, 3, 128, 96)]
    assert cache.keys() == [(1, 3, 32, 32), (1, 3, 128, 96)]
    with pytest.raises(ValueError, match="CUDA_GRAPH_CACHE_SIZE"):
        SizeLRUCache(0, capture)


def test_size_cache_builds_for_sizes_that_come_again():
    """A graph's capture costs a few runs: a size is captured the second time it comes."""
    cache = SizeLRUCache(4, lambda key: key)
    assert cache.get("a") is None and cache.get("b") is None  # first time: run without
    assert cache.get("a") == "a" and cache.get("a") == "a" and cache.keys() == ["a"]
    assert cache.get("b") == "b" and cache.keys() == ["a", "b"]


def test_size_cache_stops_building_and_warns_once_when_sizes_outnumber_it():
    """Three sizes in turn through a cache of two: each capture would be dropped again before
    its size came back. Once the cache has dropped as many as it holds, it builds no more (the
    sizes it holds keep theirs) and says so, once."""
    cache = SizeLRUCache(2, lambda key: key, build_after=1)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # a handler of its own: the logger may not propagate to root
    logger = logging.getLogger("efficientps_d2.modeling.fast_inference")
    logger.addHandler(handler)
    try:
        for size in [64, 96, 64, 96]:  # fits: nothing dropped
            cache.get((1, 3, size, size))
        assert cache.evictions == 0 and not records
        built = [cache.get((1, 3, size, size)) for size in [128, 64, 96, 128, 64, 96]]
    finally:
        logger.removeHandler(handler)
    # 128 drops 64, 64 drops 96 (the second drop: no more builds), 96 is not built.
    assert [x is not None for x in built] == [True, True, False, True, True, False]
    assert cache.evictions == 2 and cache.keys() == [(1, 3, 128, 128), (1, 3, 64, 64)]
    assert len(records) == 1 and "CUDA_GRAPH_CACHE_SIZE (2)" in records[0].getMessage()


@pytest.fixture
def exact_float32():
    """cuDNN convolves float32 in TF32 by default (a 10-bit mantissa): the fused copy's folded
    weights then round differently from the model's own by ~1e-3, and near-tied detections of
    the permissive test settings swap. The comparisons are of the paths, in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _cuda_model(opts=()):
    return _tiny_model([*PLAIN, *opts]).cuda()


def _cuda_inputs():
    return [{k: v.cuda() if torch.is_tensor(v) else v for k, v in x.items()} for x in _inputs()]


def _graphed(model, inputs):
    """``model(inputs)`` as a CUDA graph: a size's first call runs eager, its second captures
    the graph and replays it."""
    model(inputs)
    return model(inputs)


@NEEDS_CUDA
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("fast_inference", [False, True])
def test_cuda_graph_gives_the_eager_panoptic_output(fast_inference):
    model = _cuda_model()
    inputs = _cuda_inputs()
    with torch.no_grad():
        eager = model(inputs)
        _with_options(model, cuda_graph=True, fast_inference=fast_inference)
        graphed = _graphed(model, inputs)
        again = model(inputs)  # replayed
    network = model._inference_network()
    assert network.cuda_graph and len(network.graphs) == 1
    for a, b, c in zip(eager, graphed, again):
        _assert_same_panoptic(a, b)
        assert torch.equal(b["panoptic_seg"][0], c["panoptic_seg"][0])
        assert b["panoptic_seg"][1] == c["panoptic_seg"][1]


@NEEDS_CUDA
@pytest.mark.usefixtures("exact_float32")
def test_cuda_graph_cache_per_input_size_and_weights():
    model = _with_options(_cuda_model(), cuda_graph=True, cuda_graph_cache_size=2)
    inputs = _cuda_inputs()
    with torch.no_grad():
        for x in (inputs[:1], inputs[1:], inputs[:1], inputs):  # padded sizes A, B, A, C
            _graphed(model, x)
        network = model._inference_network()
        assert len(network.graphs) == 2 and [k[0] for k in network.graphs.keys()] == [
            (1, 3, 128, 160),
            (2, 3, 128, 160),
        ]
        other = _randomize(build_model(tiny_config(PERMISSIVE)), seed=1).cuda()
        model.load_state_dict(other.state_dict())
        graphed = _graphed(model, inputs[:1])[0]
        assert model._inference_network() is not network  # new weights: captured anew
        assert len(model._inference_network().graphs) == 1
        _with_options(model, cuda_graph=False)
        plain = model(inputs[:1])[0]
    _assert_same_panoptic(plain, graphed)


@NEEDS_CUDA
@pytest.mark.usefixtures("exact_float32")
def test_a_graph_captured_under_autocast_is_not_replayed_without_it():
    """A graph replays the kernels it captured: one captured under bf16 autocast, replayed for
    a float32 call of the same size, would give bf16 results."""
    model = _with_options(_cuda_model(), cuda_graph=True)
    inputs = _cuda_inputs()[:1]
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _graphed(model, inputs)
        graphed = _graphed(model, inputs)[0]
        assert len(model._inference_network().graphs) == 2  # one with autocast, one without
        _with_options(model, cuda_graph=False)
        eager = model(inputs)[0]
    _assert_same_panoptic(eager, graphed)


@NEEDS_CUDA
@pytest.mark.usefixtures("exact_float32")
def test_cuda_graph_of_the_roi_heads_gives_the_eager_panoptic_output():
    """MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS: the box and mask stages replayed as CUDA graphs on
    the dense network's outputs, captured once per input size and row count."""
    model = _cuda_model()
    inputs = _cuda_inputs()
    with torch.no_grad():
        eager = model(inputs)
        _with_options(model, cuda_graph=True, cuda_graph_roi_heads=True, fast_inference=True)
        graphed = _graphed(model, inputs)
        again = model(inputs)  # replayed
        network = model._inference_network()
        (captured,) = network.graphs._values.values()
        assert sorted(captured.roi_heads._graphs) == [("boxes", 2 * 20), ("masks", 2 * 100)]
        single = _graphed(model, inputs[:1])  # another input size: its own graphs
    assert len(network.graphs) == 2
    for a, b, c in zip(eager, graphed, again):
        _assert_same_panoptic(a, b)
        assert torch.equal(b["panoptic_seg"][0], c["panoptic_seg"][0])
        assert b["panoptic_seg"][1] == c["panoptic_seg"][1]
    _assert_same_panoptic(eager[0], single[0])


@NEEDS_CUDA
def test_bfloat16_cuda_graph_runs():
    model = _with_options(_cuda_model(), cuda_graph=True, dtype="bfloat16", fast_inference=True)
    with torch.no_grad():
        out = _graphed(model, _cuda_inputs())
    assert len(model._inference_network().graphs) == 1
    assert all(o["panoptic_seg"][0].is_cuda and o["sem_seg"].dtype == torch.float32 for o in out)


# -------------------------------------------------------------------------------------------------
# Training: torch.compile of backbone and semantic head, no cuDNN autotuning in the ROI heads
# -------------------------------------------------------------------------------------------------


def _training_batch():
    return [
        training_input(64, 96, [[8, 8, 40, 40], [50, 10, 90, 60]], [0, 1], seed=1),
        training_input(64, 96, [[20, 4, 60, 50]], [1], seed=2),
    ]


def test_compiled_training_gives_the_eager_losses_and_gradients(monkeypatch):
    """MODEL.EFFICIENTPS.COMPILE_TRAINING, with Dynamo's "eager" backend (Inductor is too slow
    to compile a B0 on two CPU cores for a unit test): same losses, gradients on the model's own
    parameters, nothing added to the state_dict."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager", **kw))
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(["MODEL.EFFICIENTPS.COMPILE_TRAINING", compiled])).train()
        keys = set(model.state_dict())
        with EventStorage():
            torch.manual_seed(1)
            losses = model(_training_batch())
        sum(losses.values()).backward()
        assert set(model.state_dict()) == keys
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    assert model._training_parts()[0] is not model.backbone  # the compiled wrapper ran
    (losses_a, grads_a), (losses_b, grads_b) = results
    torch.testing.assert_close(losses_a, losses_b)
    assert grads_a.keys() == grads_b.keys() and any("backbone" in n for n in grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_cudnn_autotuning_is_off_in_the_roi_heads_forward_and_backward(monkeypatch):
    from efficientps_d2.modeling import meta_arch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with meta_arch._cudnn_benchmark_off(torch.device("cuda")):
        assert not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark
    with meta_arch._cudnn_benchmark_off(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark

    # Backward: off from the ROI losses back to the features they read, then on again.
    seen = []
    features = torch.ones(3, requires_grad=True)
    inner = meta_arch._SetCudnnBenchmarkInBackward.apply(features, True)
    inner.register_hook(lambda g: seen.append(torch.backends.cudnn.benchmark))
    loss = meta_arch._SetCudnnBenchmarkInBackward.apply((inner * 2).sum(), False)
    loss.backward()
    assert seen == [False] and torch.backends.cudnn.benchmark
    assert torch.equal(features.grad, torch.full((3,), 2.0))


# -------------------------------------------------------------------------------------------------
# Semantic head: project-then-upsample predictor, activation checkpointing
# -------------------------------------------------------------------------------------------------


def _head(**kwargs):
    shapes = {f"p{i}": ShapeSpec(channels=24, stride=2**i) for i in (2, 3, 4, 5)}
    torch.manual_seed(0)
    head = EfficientPSSemSegHead(
        shapes, num_classes=7, convs_dim=16, dpc_channels=16, ignore_value=255, **kwargs
    )
    nn.init.normal_(head.predictor.weight, std=0.3)
    nn.init.normal_(head.predictor.bias, std=0.3)
    return head


def _features(height=72, width=104):
    torch.manual_seed(1)
    return {
        f"p{i}": torch.randn(2, 24, math.ceil(height / 2**i), math.ceil(width / 2**i))
        for i in (2, 3, 4, 5)
    }


class _InPlaceAdds(TorchDispatchMode):
    """Counts the in-place adds (add_into's) of a forward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.add_.Tensor
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("size", [(64, 96), (72, 104)])
def test_inference_sums_written_in_place_equal_new_tensors(size):
    """In inference the 2-way FPN and the semantic head add into their fresh intermediates
    (layers.add_into, add_upsampled_into: no new 134 MB map per sum at 1024x2048); the values are
    bit for bit those of the sums into new tensors that training computes (autograd needs the
    intermediates), with an exact 2x pyramid (broadcast upsampling) and an uneven one."""
    model = _tiny_model(PLAIN)
    images = torch.randn(2, 3, *size)
    # Eval-mode norms and parameters that need gradients: new tensors.
    with torch.enable_grad(), _InPlaceAdds() as new_tensor_adds:
        features = model.backbone(images)
        logits = model.sem_seg_head.layers(features)
    with torch.no_grad(), _InPlaceAdds() as adds:
        features_in_place = model.backbone(images)
        logits_in_place = model.sem_seg_head.layers(features_in_place)
    # Besides the trunk's residual adds (in place either way): 3 top-down, 3 bottom-up and 4
    # two-way sums, 2 in the head and 3 in its predictor.
    assert adds.count - new_tensor_adds.count == 15
    for name, value in features.items():
        assert torch.equal(features_in_place[name], value), name
    assert torch.equal(logits_in_place, logits)


def test_semantic_predictor_equals_concat_then_predict():
    head = _head().eval()
    features = _features()
    with torch.no_grad():
        p4, p8, p16, p32 = (features[f] for f in head.in_features)
        dpc32, dpc16 = head.dpc32(p32), head.dpc16(p16)
        coarse = dpc16 + F.interpolate(dpc32, size=dpc16.shape[-2:], mode="bilinear")
        f8 = head.lsfe8(p8) + head.mc16to8(coarse, size=p8.shape[-2:])
        f4 = head.lsfe4(p4) + head.mc8to4(f8, size=p4.shape[-2:])
        up = [F.interpolate(x, size=f4.shape[-2:], mode="bilinear") for x in (dpc32, dpc16, f8)]
        expected = head.predictor(torch.cat(up + [f4], dim=1))
        torch.testing.assert_close(head.layers(features), expected, atol=1e-5, rtol=1e-5)


def test_semantic_head_checkpointing_gives_same_loss_and_gradients():
    features = _features()
    targets = torch.randint(0, 7, (2, 72, 104))
    targets[:, :3] = 255
    results = []
    for checkpointing in (False, True):
        head = _head(activation_checkpointing=checkpointing).train()
        inputs = {k: v.clone().requires_grad_(True) for k, v in features.items()}
        _, losses = head(inputs, targets)
        losses["loss_sem_seg"].backward()
        grads = [p.grad for p in head.parameters()] + [inputs[k].grad for k in sorted(inputs)]
        results.append((losses["loss_sem_seg"].detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_semantic_head_checkpointing_from_config():
    cfg = tiny_config(["MODEL.SEM_SEG_HEAD.ACTIVATION_CHECKPOINTING", True])
    assert build_model(cfg).sem_seg_head.activation_checkpointing


# -------------------------------------------------------------------------------------------------
# Panoptic fusion: batched implementation against the one-instance-at-a-time definition
# -------------------------------------------------------------------------------------------------


def _reference_paste(mask_logits, box, rows, cols):
    x0, y0, x1, y1 = box
    ys = (torch.arange(*rows, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    xs = (torch.arange(*cols, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    return F.grid_sample(mask_logits, grid, align_corners=False, padding_mode="border")[0, 0]


def _reference_fusion(
    sem, instances, thing_ids, confidence_thresh, overlap_thresh, stuff_area_limit, scale
):
    """The fusion as first written: instances visited one by one on their box crops."""
    num_classes, height, width = sem.shape
    thing_ids = torch.as_tensor(thing_ids, dtype=torch.long)
    is_thing = torch.zeros(num_classes, dtype=torch.bool)
    is_thing[thing_ids] = True
    stuff_ids = (~is_thing).nonzero().flatten()
    if stuff_ids.numel():
        best_val = sem[stuff_ids].max(dim=0).values
    else:
        best_val = torch.full((height, width), float("-inf"))
    best_idx = torch.zeros((height, width), dtype=torch.long)
    claimed = torch.zeros((height, width), dtype=torch.bool)
    kept = []
    scores = instances.scores.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[scores[order] >= confidence_thresh].tolist()
    boxes = instances.pred_boxes.tensor.float().tolist()
    sem_ids = thing_ids[instances.pred_classes].tolist()

    def pixel_range(lo, hi, size):
        start = min(max(math.ceil(lo - 0.5), 0), size)
        return start, min(max(math.ceil(hi - 0.5), 0), size)

    for det in order:
        box = boxes[det]
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            continue
        rows, cols = pixel_range(box[1], box[3], height), pixel_range(box[0], box[2], width)
        if rows[0] >= rows[1] or cols[0] >= cols[1]:
            continue
        crop = (slice(*rows), slice(*cols))
        mla = _reference_paste(instances.pred_mask_logits[det][None], box, rows, cols) * scale
        mask = mla > 0
        area = int(mask.sum())
        if area == 0 or int((mask & claimed[crop]).sum()) > overlap_thresh * area:
            continue
        claimed[crop] |= mask
        kept.append(det)
        mlb = sem[sem_ids[det]][crop]
        fused = (mla.sigmoid() + mlb.sigmoid()) * (mla + mlb)
        wins = fused > best_val[crop]
        best_val[crop] = torch.where(wins, fused, best_val[crop])
        best_idx[crop] = torch.where(wins, len(kept), best_idx[crop])

    thing_areas = torch.bincount(best_idx.flatten(), minlength=len(kept) + 1).tolist()
    sem_argmax = sem.argmax(dim=0)
    stuff_pixels = (best_idx == 0) & ~is_thing[sem_argmax]
    stuff_areas = torch.bincount(sem_argmax[stuff_pixels], minlength=num_classes).tolist()
    info, thing_lut, stuff_lut = [], [0] * (len(kept) + 1), [0] * num_classes
    for j, det in enumerate(kept, start=1):
        if thing_areas[j]:
            thing_lut[j] = len(info) + 1
            info.append(
                {
                    "id": len(info) + 1,
                    "isthing": True,
                    "category_id": int(thing_ids[instances.pred_classes[det]]),
                    "score": float(scores[det]),
                    "instance_id": det,
                    "area": thing_areas[j],
                }
            )
    for cls in stuff_ids.tolist():
        if stuff_areas[cls] and stuff_areas[cls] >= stuff_area_limit:
            stuff_lut[cls] = len(info) + 1
            info.append(
                {
                    "id": len(info) + 1,
                    "isthing": False,
                    "category_id": cls,
                    "area": stuff_areas[cls],
                }
            )
    pan = torch.where(
        stuff_pixels,
        torch.tensor(stuff_lut, dtype=torch.int32)[sem_argmax],
        torch.tensor(thing_lut, dtype=torch.int32)[best_idx],
    )
    return pan, info


def _random_scene(seed, height, width, num, num_classes=8, things=(2, 5, 6, 7)):
    """Many overlapping instances: boxes of all sizes, some outside or degenerate, score ties."""
    g = torch.Generator().manual_seed(seed)
    sem = torch.randn(num_classes, height, width, generator=g) * 3
    xy0 = torch.rand(num, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - 6
    wh = torch.rand(num, 2, generator=g) ** 2 * torch.tensor([width * 0.8, height * 0.8])
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    boxes[0] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # zero width
    boxes[1] = torch.tensor([float("nan"), 1.0, 4.0, 4.0])
    boxes[num - 1] = torch.tensor([-float("inf"), 2.0, float("inf"), 6.0])
    scores = torch.rand(num, generator=g)
    scores[2:6] = scores[6]  # ties keep their order
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = scores
    inst.pred_classes = torch.randint(0, len(things), (num,), generator=g)
    inst.pred_mask_logits = torch.randn(num, 1, 28, 28, generator=g) * 3 + 1
    return sem, inst, list(things)


@pytest.mark.parametrize(
    "method, chunk_elements, rounds_per_check",
    [("loop", 1 << 22, 4), ("loop", 3000, 4), ("scatter", 1 << 22, 4), ("scatter", 3000, 1)],
)
def test_batched_fusion_equals_one_at_a_time_reference(
    monkeypatch, method, chunk_elements, rounds_per_check
):
    monkeypatch.setattr(crop_chunks, "CHUNK_ELEMENTS", chunk_elements)  # small: many chunks
    monkeypatch.setattr(fusion, "_ROUNDS_PER_CHECK", rounds_per_check)
    for seed in range(6):
        sem, inst, things = _random_scene(seed, 61 + 7 * seed, 93 + 5 * seed, 40)
        for confidence, overlap, limit, scale in ((0.2, 0.5, 20, 4.0), (0.0, 0.1, 0, 1.0)):
            got = panoptic_fusion(
                sem,
                inst,
                thing_semantic_ids=things,
                confidence_thresh=confidence,
                overlap_thresh=overlap,
                stuff_area_limit=limit,
                mask_logit_scale=scale,
                method=method,
            )
            expected = _reference_fusion(sem, inst, things, confidence, overlap, limit, scale)
            assert torch.equal(got[0], expected[0]), (seed, confidence)
            assert got[1] == expected[1], (seed, confidence)
            assert any(s["isthing"] for s in got[1])


def test_scatter_fusion_overlap_chains_and_fallback(monkeypatch):
    """Each box overlaps only the next: A kept, B dropped (on A), C kept (B is gone), D dropped...
    The fixed point needs one round per link; the scatter method must get the loop's answer
    whether it checks every round or not, and when its crops exceed _SCATTER_ELEMENTS."""
    height, width, num = 20, 200, 12
    sem = torch.zeros(3, height, width)
    sem[0] = 1.0
    boxes = torch.tensor([[15.0 * i, 2.0, 15.0 * i + 20, 18.0] for i in range(num)])
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.linspace(0.99, 0.6, num)
    inst.pred_classes = torch.zeros(num, dtype=torch.long)
    inst.pred_mask_logits = torch.full((num, 1, 28, 28), 3.0)
    expected = _reference_fusion(sem, inst, [2], 0.5, 0.2, 0, 4.0)
    kept = [s["instance_id"] for s in expected[1] if s["isthing"]]
    assert kept == list(range(0, num, 2))
    for rounds, limit in ((1, 1 << 25), (4, 1 << 25), (100, 1 << 25), (4, 10)):
        monkeypatch.setattr(fusion, "_ROUNDS_PER_CHECK", rounds)
        monkeypatch.setattr(fusion, "_SCATTER_ELEMENTS", limit)
        got = panoptic_fusion(
            sem,
            inst,
            thing_semantic_ids=[2],
            overlap_thresh=0.2,
            stuff_area_limit=0,
            method="scatter",
        )
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1], rounds


def test_scatter_fusion_takes_fewest_chunks_then_compact_ones_then_the_loop(monkeypatch):
    """The scatter's kernels cover whole chunks, so it takes the fewest; where their padding
    passes _SCATTER_ELEMENTS, the loop's compact chunks; past that, the loop. Same answer."""
    sem, inst, things = _random_scene(3, 120, 160, 30)
    expected = _reference_fusion(sem, inst, things, 0.0, 0.5, 0, 4.0)
    calls, chunked = [], []
    for name in ("_fuse_by_scatter", "_fuse_by_loop"):
        real = getattr(fusion, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, chunked.pop()))  # with the chunks its crops were pasted in
            return _real(*args, **kwargs)

        monkeypatch.setattr(fusion, name, spy)
    real_pasted_chunks = fusion._pasted_chunks

    def pasted_chunks(*args):
        chunked.append(args[4])  # args[4]: the chunks
        return real_pasted_chunks(*args)

    monkeypatch.setattr(fusion, "_pasted_chunks", pasted_chunks)

    def fuse():
        got = panoptic_fusion(
            sem,
            inst,
            thing_semantic_ids=things,
            confidence_thresh=0.0,
            stuff_area_limit=0,
            method="scatter",
        )
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
        return calls.pop()

    method, fewest = fuse()
    assert method == "_fuse_by_scatter"
    monkeypatch.setattr(fusion, "_SCATTER_ELEMENTS", crop_chunks.padded_elements(fewest) - 1)
    method, compact = fuse()
    assert method == "_fuse_by_scatter" and len(compact) > len(fewest)
    assert crop_chunks.padded_elements(compact) < crop_chunks.padded_elements(fewest)
    monkeypatch.setattr(fusion, "_SCATTER_ELEMENTS", crop_chunks.padded_elements(compact) - 1)
    assert fuse() == ("_fuse_by_loop", compact)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "fewest"])
def test_fusion_chunks_bound_memory_and_padding(compact):
    sizes = [(400, 300), (10, 10), (12, 9), (300, 500), (1, 1), (2000, 2000), (5, 5), (3, 4)]
    chunks = crop_chunks.chunk_crops(sizes, compact)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, end, h, w in chunks:
        members = sizes[start:end]
        assert h == max(s[0] for s in members) and w == max(s[1] for s in members)
        if end - start > 1:
            assert (end - start) * h * w <= crop_chunks.CHUNK_ELEMENTS
    if compact:  # the loop's: at most about half padding
        assert all(
            (end - start) * h * w <= 2 * sum(a * b for a, b in sizes[start:end]) + (1 << 16)
            for start, end, h, w in chunks
        )
        assert len(chunks) == 5
    else:  # the scatter's: each chunk as large as the bound allows, so as few as can be
        assert [c[:2] for c in chunks] == [(0, 5), (5, 6), (6, 8)]
    assert crop_chunks.chunk_crops([], compact) == []


def test_fusion_accepts_channels_last_logits_and_tensor_thing_ids():
    sem, inst, things = _random_scene(0, 50, 70, 20)
    expected = panoptic_fusion(sem, inst, thing_semantic_ids=things, confidence_thresh=0.1)
    sem_cl = sem[None].contiguous(memory_format=torch.channels_last)[0]
    got = panoptic_fusion(
        sem_cl, inst, thing_semantic_ids=torch.tensor(things), confidence_thresh=0.1
    )
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


@pytest.mark.parametrize("image_size", [(97, 131), (64, 96)])
def test_model_output_matches_reference_fusion(image_size):
    """End to end: the model's panoptic output is the reference fusion of its own outputs."""
    model = _tiny_model()
    image = training_input(*image_size, [], [], seed=5)["image"]
    with torch.no_grad():
        (out,) = model([{"image": image}])
    inst = out["instances"]
    assert len(inst) > 0
    thing_index = {c: i for i, c in enumerate(THING_SEMANTIC_IDS)}
    local = Instances(inst.image_size)
    local.pred_boxes = inst.pred_boxes
    local.scores = inst.scores
    local.pred_classes = torch.tensor([thing_index[int(c)] for c in inst.pred_classes])
    local.pred_mask_logits = inst.pred_mask_logits
    pan, info = _reference_fusion(out["sem_seg"], local, THING_SEMANTIC_IDS, 0.0, 0.5, 0, 4.0)
    assert torch.equal(out["panoptic_seg"][0], pan)
    assert out["panoptic_seg"][1] == info


def test_amp_precision_configures_detectron2s_amp_trainer():
    from detectron2.engine import SimpleTrainer

    from efficientps_d2.config_adapter import ConfigAdapter
    from efficientps_d2.engine import startup

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for precision, dtype, scaling in (
        ("bfloat16", torch.bfloat16, False),
        ("float16", torch.float16, True),
    ):
        cfg = tiny_config(["SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision])
        with warnings.catch_warnings():  # Detectron2's GradScaler warns without CUDA
            warnings.simplefilter("ignore")
            trainer = startup.build_trainer(model, [], optimizer, ConfigAdapter(cfg))
        assert trainer.precision == dtype and trainer.grad_scaler.is_enabled() is (
            scaling and torch.cuda.is_available()
        )
    cfg = tiny_config(["SOLVER.AMP.ENABLED", False])
    plain = startup.build_trainer(model, [], optimizer, ConfigAdapter(cfg))
    assert type(plain) is SimpleTrainer and not hasattr(plain, "precision")
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        startup.build_trainer(
            model, [], optimizer, ConfigAdapter(tiny_config(["SOLVER.AMP.PRECISION", "float64"]))
        )


class _Convolutions(TorchDispatchMode):
    """Records each convolution of a step (after autocast's casts) and its backward."""

    def __init__(self, model):
        super().__init__()
        self.forward, self.backward, self.in_roi_heads = [], [], False
        model.roi_heads.register_forward_pre_hook(lambda *_: setattr(self, "in_roi_heads", True))
        model.roi_heads.register_forward_hook(lambda *_: setattr(self, "in_roi_heads", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, weight = args[0], args[1]
            layout = x.is_contiguous(memory_format=torch.channels_last)
            self.forward.append((x.dtype, weight.dtype, layout, self.in_roi_heads, x.shape))
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bfloat16_training_convolves_in_bfloat16_and_channels_last():
    """Under bf16 autocast (SOLVER.AMP.PRECISION bfloat16) every conv of a training step, forward
    and backward, runs in bfloat16, and the dense network's in the channels-last layout: no layer
    falls back to float32 or to a layout change, which would cost a GPU step its bf16 speed."""
    torch.manual_seed(0)
    model = build_model(tiny_config(PERMISSIVE)).train()
    boxes = [(8, 8, 40, 40), (50, 20, 90, 60)]
    batch = [training_input(64, 96, boxes, [0, 1], seed=s) for s in (0, 1)]
    convolutions = _Convolutions(model)
    with EventStorage(0), convolutions:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(batch)
        sum(losses.values()).backward()
    forward = convolutions.forward
    assert forward and any(roi for *_, roi, _ in forward) and not all(roi for *_, roi, _ in forward)
    assert {(x, w) for x, w, *_ in forward} == {(torch.bfloat16, torch.bfloat16)}
    assert set(convolutions.backward) == {torch.bfloat16}
    # The images themselves come in NCHW (the stem's conv takes them in either layout).
    dense = [(layout, shape) for _, _, layout, roi, shape in forward if not roi and shape[1] != 3]
    assert dense and all(layout for layout, _ in dense), [s for ok, s in dense if not ok]
