import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    RPN_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
    build_model,
)
from detectron2.utils.events import EventStorage
from detectron2.utils.visualizer import Visualizer

from tests.common import (
    LOSS_NAMES,
    NUM_CLASSES,
    PERMISSIVE,
    THING_SEMANTIC_IDS,
    config_file,
    load_config,
    tiny_config,
    training_input,
)


def test_components_are_registered():
    assert "EfficientPS" in META_ARCH_REGISTRY
    assert "EfficientPSSemSegHead" in SEM_SEG_HEADS_REGISTRY
    assert "SeparableConvRPNHead" in RPN_HEAD_REGISTRY
    assert "SeparableConvMaskHead" in ROI_MASK_HEAD_REGISTRY


def test_b5_cityscapes_model_size_matches_the_paper():
    cfg = load_config("Cityscapes-PanopticSegmentation/efficientps_b5.yaml")
    cfg.MODEL.EFFICIENTNET.NORM = "BN"  # SyncBN builds the same parameters
    params = sum(p.numel() for p in build_model(cfg).parameters())
    assert 36.8e6 <= params <= 45.0e6, params  # the paper reports 40.89M


@pytest.mark.parametrize(
    "name",
    [
        "COCO-PanopticSegmentation/efficientps_b5.yaml",
        "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml",
        "Cityscapes-PanopticSegmentation/efficientps_R_50.yaml",
    ],
)
def test_shipped_configs_build(name):
    cfg = load_config(name, ["MODEL.EFFICIENTNET.VARIANT", "b0"])
    model = build_model(cfg)
    assert model.sem_seg_head.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    # Thing classes come from Detectron2's own metadata of the configured data set.
    assert len(model.thing_semantic_ids) == cfg.MODEL.ROI_HEADS.NUM_CLASSES


@pytest.mark.parametrize(
    "name",
    [
        "Cityscapes-PanopticSegmentation/efficientps_b5.yaml",
        "Cityscapes-PanopticSegmentation/efficientps_b5.py",
        "COCO-PanopticSegmentation/efficientps_b5.yaml",
    ],
)
@pytest.mark.parametrize("inplace_abn", [False, True], ids=["bn", "iabn"])
def test_gpu_configs_train_on_a_batch_without_things(name, inplace_abn):
    """The synchronised-BN configs keep images without things (FILTER_EMPTY_ANNOTATIONS False on
    Cityscapes): then the mask head gets no ROI, and an empty batch must not stop training, as
    torch's SyncBatchNorm would (Detectron2's Conv2d refuses it one, on any device)."""
    opts = ["MODEL.EFFICIENTNET.VARIANT", "b0", "MODEL.WEIGHTS", ""]
    opts += ["MODEL.EFFICIENTPS.INPLACE_ABN", inplace_abn]
    if name.endswith(".py"):
        from efficientps_d2.config_adapter import ConfigAdapter
        from efficientps_d2.engine.lazy_config import load_config as load_lazy_config

        cfg = ConfigAdapter(
            load_lazy_config(
                config_file(name),
                [
                    "model.backbone.bottom_up.variant=b0",
                    f"model.inplace_abn={inplace_abn}",
                ],
            )
        )
        model = cfg.build_model()
    else:
        model = build_model(load_config(name, opts))
    batch = [training_input(64, 96, [], [], seed=1)]
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_step_gives_finite_losses_and_gradients_in_every_head():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    batch = [
        training_input(97, 131, [[10, 20, 50, 60], [40, 30, 90, 80], [45, 35, 95, 85]], [0, 1, 1]),
        training_input(70, 101, [], [], seed=1),  # an image without instances
    ]
    with EventStorage():
        losses = model(batch)
    assert set(losses) == LOSS_NAMES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for part in (
        model.backbone.bottom_up,
        model.backbone.output_convs,
        model.sem_seg_head,
        model.proposal_generator.rpn_head,
        model.roi_heads.box_head,
        model.roi_heads.mask_head,
    ):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_training_inputs_are_checked_dict_by_dict_and_any_integer_labels_train():
    """A later dict without targets gave a bare KeyError 'sem_seg' (only the first was checked,
    after the backbone had run); a semantic map smaller than its image but padded to the same
    size trained on shifted labels without a word; uint8 or int32 labels failed inside cross
    entropy ("expected scalar type Long but found Byte")."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    good = training_input(64, 96, [[10, 10, 40, 40]], [0])
    with pytest.raises(ValueError, match=r"'sem_seg' .* missing in batched_inputs\[1\]"):
        model([good, {"image": good["image"], "instances": good["instances"]}])
    small = dict(good, sem_seg=good["sem_seg"][:60, :90])
    with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['sem_seg'\] .* \(64, 96\), got"):
        model([good, small])
    # An (H, W, 3) image is named as such, as in inference, not as a semantic map of (96, 3).
    hwc = dict(good, image=good["image"].permute(1, 2, 0))
    with pytest.raises(ValueError, match=r"batched_inputs\[0\]\['image'\] must be a \(3, H, W\)"):
        model([hwc])
    with EventStorage():
        expected = model([good])["loss_sem_seg"]
        for dtype in (torch.uint8, torch.int32):
            labels = good["sem_seg"].to(dtype)
            assert torch.equal(model([dict(good, sem_seg=labels)])["loss_sem_seg"], expected)


def test_empty_boxes_and_classes_out_of_range_are_named_with_their_image():
    """An empty or NaN ground-truth box made the RPN's box loss inf or NaN; a class past the
    ROI heads' failed in cross entropy ("Target 5 is out of bounds"), naming no image."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    good = training_input(64, 96, [[10, 10, 40, 40]], [1])
    for box, classes, message in [
        ([10, 10, 10, 30], [1], r"instance 0's gt_boxes \[10.0, 10.0, 10.0, 30.0\] is empty"),
        (
            [float("nan"), 10, 40, 40],
            [1],
            r"instance 0.s gt_boxes \[nan, .* is empty or not finite",
        ),
        ([10, 10, 40, 40], [2], r"its gt_classes \[2\] are not all thing classes in \[0, 2\)"),
    ]:
        bad = dict(training_input(64, 96, [[10, 10, 40, 40]], [0]), file_name="bad.png")
        bad["instances"].gt_boxes.tensor[0] = torch.tensor(box)
        bad["instances"].gt_classes = torch.tensor(classes)
        with pytest.raises(ValueError, match=r"batched_inputs\[1\] \(bad.png\): " + message):
            model([good, bad])


def test_a_lone_training_image_of_one_position_at_stride_32_is_named():
    """Padded to 32 x 32, a lone image is one value per channel at stride 32: torch's BatchNorm
    raised "Expected more than 1 value per channel when training", naming no image. With a second
    image, or one more pixel (padded to 32 x 64), the step trains."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    lone = dict(training_input(20, 32, [[2, 2, 12, 12]], [0]), file_name="tiny.png")
    named = r"batched_inputs\[0\] \(tiny.png\) is \(20, 32\) \(H, W\), alone in its batch"
    with pytest.raises(ValueError, match=named):
        model([lone])
    # The same where the semantic head's BatchNorm is the first to meet the one position.
    frozen = ["MODEL.EFFICIENTNET.NORM", "FrozenBN", "MODEL.TWO_WAY_FPN.NORM", "FrozenBN"]
    with pytest.raises(ValueError, match=named):
        build_model(tiny_config(frozen)).train()([lone])
    with EventStorage():
        for batch in (
            [lone, training_input(20, 32, [], [], seed=1)],
            [training_input(20, 33, [], [])],
        ):
            assert all(torch.isfinite(v) for v in model(batch).values())


def test_inference_contract_at_requested_size():
    torch.manual_seed(0)
    model = build_model(tiny_config(PERMISSIVE)).eval()
    image = training_input(90, 120, [], [])["image"]
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 45, "width": 60}])
    assert out["sem_seg"].shape == (NUM_CLASSES, 45, 60)
    instances = out["instances"]
    assert instances.image_size == (45, 60) and len(instances) > 0
    assert instances.pred_masks.shape[1:] == (45, 60)
    assert set(instances.pred_classes.tolist()) <= set(THING_SEMANTIC_IDS)
    panoptic_seg, segments_info = out["panoptic_seg"]
    assert panoptic_seg.dtype == torch.int32 and panoptic_seg.shape == (45, 60)
    ids = set(panoptic_seg.unique().tolist()) - {0}
    assert ids == {s["id"] for s in segments_info}
    for s in segments_info:
        assert (panoptic_seg == s["id"]).sum() == s["area"]
        if s["isthing"]:
            assert s["category_id"] in THING_SEMANTIC_IDS and 0 <= s["score"] <= 1
        else:
            assert s["category_id"] not in THING_SEMANTIC_IDS


def test_default_predictor_and_visualizer_accept_the_output():
    cfg = tiny_config(PERMISSIVE)
    predictor = DefaultPredictor(cfg)
    image = np.random.RandomState(0).randint(0, 255, (70, 99, 3), dtype=np.uint8)
    out = predictor(image)
    assert out["panoptic_seg"][0].shape == (70, 99)
    names = ["sky", "road", "grass", "disc", "square"]
    metadata = MetadataCatalog.get("__efficientps_test_visualizer")
    metadata.set(thing_classes=names, stuff_classes=names)
    vis = Visualizer(image[:, :, ::-1], metadata)
    drawn = vis.draw_panoptic_seg(out["panoptic_seg"][0], out["panoptic_seg"][1]).get_image()
    assert drawn.shape == (70, 99, 3)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(PERMISSIVE)
    model = build_model(cfg)
    with EventStorage():  # move BN statistics off their defaults
        model(
            [training_input(64, 96, [[5, 5, 40, 40]], [1]), training_input(64, 96, [], [], seed=2)]
        )
    model.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    torch.manual_seed(1)
    restored = build_model(cfg).eval()
    DetectionCheckpointer(restored).load(str(tmp_path / "model.pth"))
    inputs = [{"image": training_input(64, 96, [], [], seed=3)["image"]}]
    with torch.no_grad():
        a, b = model(inputs)[0], restored(inputs)[0]
    assert torch.equal(a["sem_seg"], b["sem_seg"])
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.ROI_MASK_HEAD.NAME", "NoSuchMaskHead"),
        ("MODEL.RPN.HEAD_NAME", "NoSuchRPNHead"),
        ("MODEL.META_ARCHITECTURE", "NoSuchArch"),
    ],
)
def test_unknown_head_names_are_reported(key, value):
    with pytest.raises(KeyError, match=value) as e:
        build_model(tiny_config([key, value]))
    assert "registry" in str(e.value).lower()  # Detectron2 lists the registry's entries


@pytest.mark.parametrize(
    "key, value",
    [
        ("CONFIDENCE_THRESH", 50.0),  # a percentage: no thing would ever be fused
        ("OVERLAP_THRESH", -0.5),
        ("STUFF_AREA_LIMIT", -1),
        ("MASK_LOGIT_SCALE", 0.0),  # refused at the first inference, without the key
    ],
)
def test_fusion_settings_are_checked_when_the_model_is_built(key, value):
    with pytest.raises(ValueError, match=f"MODEL.PANOPTIC_FUSION.{key} must be .* got {value}"):
        build_model(tiny_config([f"MODEL.PANOPTIC_FUSION.{key}", value]))


@pytest.mark.parametrize(
    "opts, error, message",
    [
        # Trained without a mask loss, then stopped at the first inference in the fusion.
        (["MODEL.MASK_ON", False], ValueError, "needs the mask head: set MODEL.MASK_ON True"),
        # A StandardROIHeads subclass: it trained, then inference ran StandardROIHeads' box
        # inference on its ModuleList of box heads ("missing the required forward function").
        (
            ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"]
            + ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True],
            NotImplementedError,
            r"MODEL.ROI_HEADS.NAME .*got CascadeROIHeads \(it overrides forward, _forward_box\)",
        ),
        (["MODEL.KEYPOINT_ON", True], NotImplementedError, "with a keypoint head"),
    ],
    ids=["mask-off", "cascade", "keypoints"],
)
def test_heads_that_inference_cannot_run_are_refused_when_the_model_is_built(opts, error, message):
    with pytest.raises(error, match=message):
        build_model(tiny_config(opts))


@pytest.mark.parametrize(
    "image_format, what",
    [("L", "a 1-channel format"), ("RGBA", "a 4-channel format"), ("XYZ", "not")],
)
def test_input_formats_without_3_channels_are_refused_when_the_model_is_built(image_format, what):
    """INPUT.FORMAT "L" built a model that the first training batch, once read, could not run
    ((1, H, W) images; a (3, H, W) input is the contract)."""
    with pytest.raises(ValueError, match=rf"INPUT.FORMAT .* '{image_format}' is {what}"):
        build_model(tiny_config(["INPUT.FORMAT", image_format]))


def test_thing_semantic_ids_are_checked():
    with pytest.raises(ValueError, match="THING_SEMANTIC_IDS.*NUM_CLASSES"):
        build_model(tiny_config(["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", [3]]))
    with pytest.raises(ValueError, match="THING_SEMANTIC_IDS.*within"):
        build_model(tiny_config(["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", [3, 9]]))
    with pytest.raises(ValueError, match="no data set"):
        build_model(tiny_config(["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", []]))
    # A data set not (yet) registered: the message named neither it nor the reason.
    opts = ["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", [], "DATASETS.TRAIN", ("mydata_trian",)]
    with pytest.raises(ValueError, match="data set 'mydata_trian'.*no such data set is registered"):
        build_model(tiny_config(opts))
