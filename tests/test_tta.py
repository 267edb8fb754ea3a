"""Test-time augmentation: same contract as the plain model, exact with one identity augmentation,
flip-equivariant, and the plain-vs-TTA PQ script."""

import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model

from efficientps_d2.config import tta_config
from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.data.metadata import panoptic_metadata
from efficientps_d2.demo import CocoPanopticWriter, EfficientPSPredictor
from efficientps_d2.engine import load_config
from efficientps_d2.modeling import EfficientPSWithTTA
from efficientps_d2.modeling.test_time_augmentation import check_tta_settings
from tests import common
from tests.common import NUM_CLASSES, THING_SEMANTIC_IDS, tiny_config, training_input
from tests.test_lazy_config import QUICK_PY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERMISSIVE = [*common.PERMISSIVE, "TEST.DETECTIONS_PER_IMAGE", 20]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(PERMISSIVE)).eval()


def _image(height, width, seed=0):
    return training_input(height, width, [], [], seed=seed)["image"]


def _assert_same_output(a, b):
    assert torch.equal(a["sem_seg"], b["sem_seg"])
    ia, ib = a["instances"], b["instances"]
    assert ia.image_size == ib.image_size and len(ia) == len(ib) > 0
    for name in ("scores", "pred_classes", "pred_masks", "pred_mask_logits"):
        assert torch.equal(ia.get(name), ib.get(name)), name
    assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]


@pytest.mark.parametrize("size, output", [((64, 96), None), ((71, 99), (35, 50))])
def test_one_identity_augmentation_reproduces_the_plain_model(model, size, output):
    cfg = tiny_config(PERMISSIVE)
    tta = EfficientPSWithTTA(cfg, model, min_sizes=[min(size)], max_size=1000, flip=False)
    inputs = {"image": _image(*size)}
    if output:
        inputs.update(height=output[0], width=output[1])
    with torch.no_grad():
        plain = model([inputs])[0]
    _assert_same_output(tta([inputs])[0], plain)


def test_multi_scale_flip_output_has_the_plain_contract(model):
    cfg = tiny_config(
        PERMISSIVE + ["TEST.PANOPTIC_TTA.MIN_SIZES", [48, 77], "TEST.PANOPTIC_TTA.MAX_SIZE", 150]
    )
    tta = EfficientPSWithTTA(cfg, model)
    assert tta.flip and tta.min_sizes == [48, 77]
    inputs = [{"image": _image(71, 99), "height": 50, "width": 70}, {"image": _image(45, 61, 1)}]
    with torch.no_grad():
        plain = model(inputs)
    outputs = tta(inputs)
    assert len(outputs) == 2
    for out, ref, size in zip(outputs, plain, [(50, 70), (45, 61)]):
        assert out.keys() == ref.keys()
        assert out["sem_seg"].shape == (NUM_CLASSES,) + size
        assert out["sem_seg"].dtype == ref["sem_seg"].dtype == torch.float32
        instances = out["instances"]
        assert instances.image_size == size and 0 < len(instances) <= 20
        assert instances.get_fields().keys() == ref["instances"].get_fields().keys()
        assert instances.pred_masks.shape[1:] == size
        assert set(instances.pred_classes.tolist()) <= set(THING_SEMANTIC_IDS)
        panoptic_seg, segments_info = out["panoptic_seg"]
        assert panoptic_seg.dtype == torch.int32 and panoptic_seg.shape == size
        assert set(panoptic_seg.unique().tolist()) - {0} == {s["id"] for s in segments_info}
        keys = {s["isthing"]: s.keys() for s in ref["panoptic_seg"][1]}
        for s in segments_info:
            assert s.keys() == keys[s["isthing"]]
            assert (panoptic_seg == s["id"]).sum() == s["area"]
            assert (s["category_id"] in THING_SEMANTIC_IDS) == s["isthing"]
            if s["isthing"]:
                assert instances.pred_classes[s["instance_id"]] == s["category_id"]
                assert instances.scores[s["instance_id"]] == pytest.approx(s["score"])


def test_flip_tta_is_flip_equivariant(model):
    cfg = tiny_config(PERMISSIVE)
    tta = EfficientPSWithTTA(cfg, model, min_sizes=[63], flip=True)
    image = _image(63, 97)
    a, b = tta([{"image": image}, {"image": image.flip(-1)}])
    torch.testing.assert_close(b["sem_seg"], a["sem_seg"].flip(-1), rtol=0, atol=1e-4)
    symmetric = torch.cat([image[..., :48], image[..., :49].flip(-1)], dim=-1)
    (c,) = tta([{"image": symmetric}])
    torch.testing.assert_close(c["sem_seg"], c["sem_seg"].flip(-1), rtol=0, atol=1e-4)
    # The best detection's mirror image was found by the flipped run: same score, mirrored box
    # (unless NMS merged the two, which leaves a box close to its own mirror image).
    instances = c["instances"]
    box = instances.pred_boxes.tensor[0]
    mirror = torch.stack([97 - box[2], box[1], 97 - box[0], box[3]])
    twins = (instances.scores == instances.scores[0]).nonzero().flatten()
    distances = (instances.pred_boxes.tensor[twins] - mirror).abs().max(dim=1).values
    assert distances.min() < 1e-3 or (box - mirror).abs().max() < 0.5 * (box[2] - box[0])


def test_no_detection_gives_a_stuff_only_result(model):
    cfg = tiny_config(PERMISSIVE)
    empty = build_model(tiny_config(PERMISSIVE + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1.01]))
    empty.load_state_dict(model.state_dict())
    tta = EfficientPSWithTTA(cfg, empty.eval(), min_sizes=[40, 64], flip=True)
    (out,) = tta([{"image": _image(64, 96)}])
    assert len(out["instances"]) == 0
    assert out["panoptic_seg"][1] and not any(s["isthing"] for s in out["panoptic_seg"][1])


def test_wrapper_refuses_training_mode_and_other_models(model):
    cfg = tiny_config(PERMISSIVE)
    tta = EfficientPSWithTTA(cfg, model)
    tta.train()
    with pytest.raises(RuntimeError, match="eval"):
        tta([{"image": _image(64, 96)}])
    tta.eval()
    with pytest.raises(TypeError, match="EfficientPS model"):
        EfficientPSWithTTA(cfg, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="^min_sizes must be a non-empty list"):
        EfficientPSWithTTA(cfg, model, min_sizes=[])


def test_detectron2s_rcnn_tta_wrapper_is_pointed_to_efficientps_own():
    """Detectron2's tools/train_net.py wraps the model in GeneralizedRCNNWithTTA when
    TEST.AUG.ENABLED, the key EfficientPS's own TTA reads: it stopped with "inference() got
    multiple values for argument 'do_postprocess'"."""
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = tiny_config(PERMISSIVE + ["TEST.AUG.MIN_SIZES", (64,), "TEST.AUG.MAX_SIZE", 128])
    model = build_model(cfg).eval()  # the wrapper leaves its mask head off when inference fails
    inputs = [{"image": _image(64, 96), "height": 64, "width": 96}]
    with pytest.raises(NotImplementedError, match="is efficientps_d2.modeling.EfficientPSWithTTA"):
        GeneralizedRCNNWithTTA(cfg, model)(inputs)
    model.roi_heads.mask_on = True
    with pytest.raises(NotImplementedError, match="takes no detected_instances"):
        model.inference(inputs, [None])


@pytest.mark.parametrize(
    "settings, key",
    [
        (([], 1024, True), "min_sizes"),
        ((512, 1024, True), "min_sizes"),
        (([512, 0], 1024, True), "min_sizes"),
        (([512.5], 1024, True), "min_sizes"),
        ((["512"], 1024, True), "min_sizes"),
        (([512], 2.5, True), "max_size"),
        (([512], -1, True), "max_size"),
        (([512], True, True), "max_size"),
        (([512], 1024, "False"), "flip"),
        (([512], 1024, 2), "flip"),
    ],
)
def test_tta_settings_refuse_what_is_no_size_or_yes_no(settings, key):
    keys = ("train.tta.min_sizes", "train.tta.max_size", "train.tta.flip")
    with pytest.raises(ValueError, match=rf"^train\.tta\.{key} must be .*, got "):
        check_tta_settings(*settings, keys=keys)


def test_tta_settings_take_whole_floats_at_start_up_and_in_the_wrapper(model):
    # The start-up check refused train.tta.max_size=4096.0, which EfficientPSWithTTA had always
    # run with (int()); both now use check_tta_settings.
    lazy = load_config(QUICK_PY, ["train.tta.min_sizes=[96.0,128]", "train.tta.max_size=4096.0"])
    assert ConfigAdapter(lazy).tta_settings() == ([96, 128], 4096, True)
    cfg = tiny_config(PERMISSIVE + ["TEST.AUG.FLIP", False])
    tta = EfficientPSWithTTA(cfg, model, min_sizes=(64.0, np.int64(80)), max_size=1024.0)
    assert (tta.min_sizes, tta.max_size, tta.flip) == ([64, 80], 1024, False)
    assert all(type(s) is int for s in tta.min_sizes) and type(tta.max_size) is int
    with pytest.raises(ValueError, match=r"^max_size must be a positive size .*, got 2\.5\.$"):
        EfficientPSWithTTA(cfg, model, max_size=2.5)
    with pytest.raises(ValueError, match=r"^TEST\.AUG\.MIN_SIZES must be .*, got \(\)\.$"):
        EfficientPSWithTTA(tiny_config(PERMISSIVE + ["TEST.AUG.MIN_SIZES", ()]), model)


def test_pq_script_compares_plain_and_tta(tmp_path, model, capsys):
    """benchmarks/tta_pq.py on a data set made of the plain model's own predictions."""
    categories = [
        {"id": 1, "name": "disc", "isthing": 1},
        {"id": 2, "name": "square", "isthing": 1},
        {"id": 10, "name": "sky", "isthing": 0},
        {"id": 11, "name": "road", "isthing": 0},
        {"id": 12, "name": "grass", "isthing": 0},
    ]
    # Things come first in this metadata: Mask R-CNN classes 0, 1 are semantic classes 0, 1.
    opts = PERMISSIVE + ["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", [0, 1]]
    cfg = tiny_config(opts)
    DetectionCheckpointer(model, str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())

    images = tmp_path / "images"
    images.mkdir()
    writer = CocoPanopticWriter(
        str(tmp_path / "gt.json"), str(tmp_path / "gt"), Metadata(**panoptic_metadata(categories))
    )
    predictor = EfficientPSPredictor(cfg)
    for i, (h, w) in enumerate([(64, 96), (57, 83)]):
        image = np.random.RandomState(i).randint(0, 255, (h, w, 3), np.uint8)
        cv2.imwrite(str(images / f"im{i}.png"), image)
        writer.add(f"im{i}", f"im{i}.png", *predictor(image)["panoptic_seg"], height=h, width=w)
    writer.write_json()

    spec = importlib.util.spec_from_file_location(
        "tta_pq", os.path.join(REPO, "benchmarks", "tta_pq.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = (
        ["--config-file", str(config_file), "--weights", str(tmp_path / "weights.pth")]
        + ["--panoptic-json", str(tmp_path / "gt.json"), "--panoptic-root", str(tmp_path / "gt")]
        + ["--image-root", str(images), "--output-json"]
    )
    opts = ["--opts", "TEST.PANOPTIC_TTA.MIN_SIZES", "[48, 64]", "TEST.PANOPTIC_TTA.MAX_SIZE"]
    opts += ["200", "DATALOADER.NUM_WORKERS", "0"]
    # An --output-json that cannot be written stops the script before both evaluations (it
    # failed after them, the results printed but not kept).
    with pytest.raises(SystemExit, match=f"--output-json '{images}' is a folder"):
        script.main(args + [str(images)] + opts)
    assert "tta_pq_gt" not in DatasetCatalog.list()
    results = script.main(args + [str(tmp_path / "pq.json")] + opts)
    assert results["plain"]["PQ"] == pytest.approx(100.0)
    assert 0.0 <= results["tta"]["PQ"] <= 100.0
    printed = capsys.readouterr().out
    assert "min sizes [48, 64]" in printed and "plain" in printed and "delta" in printed
    assert (tmp_path / "pq.json").exists()

    # --max-images: scored against those images' ground truth only (panopticapi stopped with
    # "no prediction for the image with id" after the whole plain pass).
    cfg.merge_from_list(["TEST.AUG.MIN_SIZES", [48], "TEST.AUG.MAX_SIZE", 200])
    first = script.evaluate_plain_and_tta(cfg, "tta_pq_gt", max_images=1)
    assert first["plain"]["PQ"] == pytest.approx(100.0)
    assert "tta_pq_gt_first_1" not in DatasetCatalog.list()


def test_settings_come_from_test_aug_and_the_deprecated_alias_overrides_them(model, caplog):
    cfg = tiny_config(["TEST.AUG.MIN_SIZES", [40, 56], "TEST.AUG.FLIP", False])
    assert tta_config(cfg).MIN_SIZES == (40, 56)
    tta = EfficientPSWithTTA(cfg, model)
    assert tta.min_sizes == [40, 56] and not tta.flip and tta.max_size == cfg.TEST.AUG.MAX_SIZE

    cfg = tiny_config(["TEST.PANOPTIC_TTA.ENABLED", True, "TEST.PANOPTIC_TTA.FLIP", True])
    cfg.freeze()
    with caplog.at_level("WARNING", logger="efficientps_d2.config"):
        settings = tta_config(cfg)
    assert settings.ENABLED and settings.FLIP and not cfg.TEST.AUG.ENABLED
    assert "TEST.AUG.ENABLED, TEST.AUG.FLIP" in caplog.text and "deprecated" in caplog.text


def test_the_predictor_gives_what_evaluation_gives_with_tta(model, tmp_path):
    """EfficientPSPredictor hands the model the uint8 image that the test loader gives, so that
    test-time augmentation resizes it as in evaluation (with PIL; a float image is resized by
    torch, to other values), and a GPU uploads a quarter of float32's bytes."""
    cfg = tiny_config(PERMISSIVE + ["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", [48, 80]])
    DetectionCheckpointer(model, str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    predictor = EfficientPSPredictor(cfg)
    bgr = np.random.RandomState(0).randint(0, 256, (64, 96, 3), np.uint8)
    got = predictor(bgr)
    image = bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr
    as_loaded = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))  # uint8
    with torch.no_grad():
        expected = predictor.model([{"image": as_loaded, "height": 64, "width": 96}])[0]
    _assert_same_output(got, expected)
