"""demo.py and efficientps_d2.demo: images (with a corrupt file), the COCO panoptic export read
by Detectron2's evaluator, video (whole, truncated, codec fallback) and clear errors."""

import json
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.modeling import build_model
from panopticapi.utils import rgb2id
from PIL import Image

import demo
from efficientps_d2.checkpoint import AtomicDetectionCheckpointer
from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.data.metadata import panoptic_metadata
from efficientps_d2.demo import (
    CocoPanopticWriter,
    EfficientPSPredictor,
    count_video_frames,
    id_to_rgb,
    open_video_writer,
    to_coco_segments,
)
from efficientps_d2.engine import load_config
from tests.common import PERMISSIVE as COMMON_PERMISSIVE
from tests.common import save_random_model, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITYSCAPES = "cityscapes_fine_panoptic_val"  # Detectron2's built-in metadata; no files needed
# Few detections per image keep the demo quick.
PERMISSIVE = [*COMMON_PERMISSIVE, "TEST.DETECTIONS_PER_IMAGE", 10]
# A small data set of our own: 3 stuff and 2 thing categories with non-contiguous ids.
CATEGORIES = [
    {"id": 7, "name": "road", "isthing": 0},
    {"id": 11, "name": "wall", "isthing": 0},
    {"id": 23, "name": "sky", "isthing": 0},
    {"id": 24, "name": "person", "isthing": 1},
    {"id": 26, "name": "car", "isthing": 1},
]


def _cfg(dataset, weights=""):
    """Tiny config whose classes come from ``dataset``'s metadata."""
    opts = PERMISSIVE + ["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", [], "MODEL.WEIGHTS", weights]
    num_things = len(MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id)
    num_classes = num_things + len(MetadataCatalog.get(dataset).stuff_dataset_id_to_contiguous_id)
    opts += [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        num_classes,
        "MODEL.ROI_HEADS.NUM_CLASSES",
        num_things,
    ]
    cfg = tiny_config(opts)
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = (dataset,)
    return cfg


@pytest.fixture(scope="module")
def small_dataset():
    name = f"__demo_test_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(**panoptic_metadata(CATEGORIES))
    return name


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, small_dataset):
    """Random weights and a config file, for Cityscapes' metadata and for the small data set."""
    folder = tmp_path_factory.mktemp("model")
    files = {}
    for key, dataset in (("cityscapes", CITYSCAPES), ("small", small_dataset)):
        cfg = _cfg(dataset)
        files[key] = (save_random_model(cfg, folder, key), cfg)
    return files


def _write_images(folder):
    folder.mkdir()
    rng = np.random.RandomState(0)
    cv2.imwrite(str(folder / "a.png"), rng.randint(0, 255, (64, 96, 3), np.uint8))
    cv2.imwrite(str(folder / "b.jpg"), rng.randint(0, 255, (61, 90, 3), np.uint8))
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def _write_video(path, frames=6, fourcc="mp4v"):
    rng = np.random.RandomState(1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (96, 64))
    assert writer.isOpened()
    for _ in range(frames):
        writer.write(rng.randint(0, 255, (64, 96, 3), np.uint8))
    writer.release()
    return path


def test_cli_skips_a_corrupt_image_and_its_export_evaluates_to_pq_100(tmp_path, model_files):
    config_file, cfg = model_files["cityscapes"]
    images = _write_images(tmp_path / "images")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "demo.py"), "--config-file", config_file]
        + ["--input", str(images), "--output", str(out), "--save-panoptic"]
        + ["--opts", "MODEL.DEVICE", "cpu"],
        cwd=str(tmp_path),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Processed 2 images, skipped 1" in proc.stderr
    assert "broken.jpg: unreadable image" in proc.stderr
    assert sorted(os.listdir(out)) == ["a.png", "b.jpg", "panoptic", "predictions.json"]
    assert cv2.imread(str(out / "b.jpg")).shape == (61, 90, 3)

    predictions = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == ["a", "b"]
    metadata = MetadataCatalog.get(CITYSCAPES)
    dataset_ids = set(metadata.thing_dataset_id_to_contiguous_id) | set(
        metadata.stuff_dataset_id_to_contiguous_id
    )
    assert {c["id"] for c in predictions["categories"]} == dataset_ids
    for ann in predictions["annotations"]:
        ids = rgb2id(np.asarray(Image.open(out / "panoptic" / ann["file_name"])))
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert s["category_id"] in dataset_ids and (ids == s["id"]).sum() == s["area"]

    # 1. The export is a valid COCO panoptic data set: it registers and loads (files and
    # categories checked), and Detectron2's evaluator scores it against itself with PQ 100.
    name = f"__demo_export_{uuid.uuid4().hex[:8]}"
    register_panoptic_dataset(
        name,
        image_root=str(images),
        panoptic_root=str(out / "panoptic"),
        panoptic_json=str(out / "predictions.json"),
    )
    evaluator = COCOPanopticEvaluator(name)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        ids = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"])))
        segments = [
            {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
            for s in d["segments_info"]
        ]
        evaluator.process([d], [{"panoptic_seg": (torch.from_numpy(ids), segments)}])
    assert evaluator.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)

    # 2. The model's own output, id-mapped by Detectron2's evaluator with Cityscapes' metadata,
    # matches the export (same weights, deterministic): PQ 100 again.
    gt = f"__demo_export_cs_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(gt).set(
        panoptic_json=str(out / "predictions.json"),
        panoptic_root=str(out / "panoptic"),
        thing_dataset_id_to_contiguous_id=metadata.thing_dataset_id_to_contiguous_id,
        stuff_dataset_id_to_contiguous_id=metadata.stuff_dataset_id_to_contiguous_id,
    )
    predictor = EfficientPSPredictor(cfg)
    evaluator = COCOPanopticEvaluator(gt)
    evaluator.reset()
    for image_id, file_name in (("a", "a.png"), ("b", "b.jpg")):
        image = read_image(str(images / file_name), format="BGR")
        evaluator.process([{"image_id": image_id, "file_name": file_name}], [predictor(image)])
    assert evaluator.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)


def test_export_maps_classes_back_to_dataset_ids(small_dataset):
    metadata = MetadataCatalog.get(small_dataset)
    ids = np.array([[1, 1, 2], [0, 3, 3]], dtype=np.int32)
    # Contiguous ids: things first (person 0, car 1), then stuff (road 2, wall 3, sky 4).
    segments = [
        {"id": 1, "category_id": 1, "isthing": True, "score": 0.9},
        {"id": 2, "category_id": 4, "isthing": False},
        {"id": 3, "category_id": 2, "isthing": False},
        {"id": 4, "category_id": 3, "isthing": False},  # no pixel: left out
    ]
    coco = to_coco_segments(ids, segments, metadata)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in coco] == [
        (1, 26, 1, 2),
        (2, 23, 0, 1),
        (3, 7, 0, 2),
    ]
    assert coco[0]["bbox"] == [0, 0, 2, 1] and coco[0]["score"] == pytest.approx(0.9)
    big = np.array([[0, 255, 256, 70000, 256**3 - 1]])
    assert np.array_equal(rgb2id(id_to_rgb(big)), big)
    with pytest.raises(ValueError, match="does not map"):
        to_coco_segments(ids, [{"id": 1, "category_id": 0, "isthing": False}], metadata)


def test_a_new_export_removes_the_json_of_the_pngs_it_replaces(small_dataset, tmp_path):
    # A run killed between its first PNG and its json left the earlier run's json describing
    # PNGs of two runs: pq_compute scored one run's segments against the other's classes.
    metadata = MetadataCatalog.get(small_dataset)
    segments = [{"id": 1, "category_id": 0, "isthing": True, "score": 0.9}]

    def writer():
        return CocoPanopticWriter(str(tmp_path / "p.json"), str(tmp_path / "png"), metadata)

    earlier = writer()
    for name in ("a", "b"):
        earlier.add(name, f"{name}.jpg", np.ones((2, 3), np.int32), segments, height=2, width=3)
    earlier.write_json()
    killed = writer()
    killed.add("a", "a.jpg", np.zeros((2, 3), np.int32), [], height=2, width=3)
    assert not (tmp_path / "p.json").exists()  # no json of a mix of two runs' PNGs
    killed.write_json()
    assert [i["id"] for i in json.loads((tmp_path / "p.json").read_text())["images"]] == ["a"]


def test_video_keeps_every_frame_in_order(tmp_path, model_files, capsys):
    config_file, _ = model_files["small"]
    video = _write_video(tmp_path / "clip.mp4")
    rc = demo.main(
        ["--config-file", config_file, "--video-input", str(video)]
        + ["--output", str(tmp_path / "out") + os.sep, "--save-panoptic"]
    )
    assert rc == 0, capsys.readouterr().err
    output = tmp_path / "out" / "clip.mp4"
    assert count_video_frames(str(output)) == 6
    capture = cv2.VideoCapture(str(output))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape == (64, 96, 3)
    assert "Wrote 6 frames" in capsys.readouterr().out
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == [
        f"clip_{i:06d}" for i in range(6)
    ]
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".")]  # no temp files


def test_truncated_video_keeps_and_reports_partial_output(tmp_path, model_files, capsys, caplog):
    config_file, _ = model_files["small"]
    data = _write_video(tmp_path / "full.avi", fourcc="MJPG").read_bytes()
    video = tmp_path / "cut.avi"
    video.write_bytes(data[: len(data) // 2])  # the header still announces 6 frames
    rc = demo.main(
        ["--config-file", config_file, "--video-input", str(video)]
        + ["--output", str(tmp_path / "cut_out.avi")]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    written = count_video_frames(str(tmp_path / "cut_out.avi"))
    assert 0 < written < 6
    assert f"ended after {written} of its 6 frames" in err
    assert "ended after" not in caplog.text  # reported once, by demo.py, not logged again


def test_codec_fallback_reports_the_codec_used(tmp_path):
    codecs = (("XXXX", ".mp4"), ("MJPG", ".avi"))  # no OpenCV build writes "XXXX"
    writer, tmp, final, fourcc = open_video_writer(str(tmp_path / "v.mp4"), 5, (96, 64), codecs)
    for _ in range(3):
        writer.write(np.zeros((64, 96, 3), np.uint8))
    writer.release()
    os.replace(tmp, final)
    assert (fourcc, final) == ("MJPG", str(tmp_path / "v.avi"))
    assert count_video_frames(final) == 3
    with pytest.raises(RuntimeError, match="tried XXXX"):
        open_video_writer(str(tmp_path / "w.mp4"), 5, (96, 64), codecs[:1])


def test_unreadable_inputs_are_clear_errors(tmp_path, model_files, capsys):
    config_file, _ = model_files["small"]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 1000)
    cases = [
        # (--output tmp_path would name the input itself: refused before it is read.)
        (["--video-input", str(corrupt), "--output", str(tmp_path / "o")], "corrupt.mp4' cannot"),
        (["--video-input", str(tmp_path / "none.mp4"), "--output", str(tmp_path)], "none.mp4"),
        (["--webcam", "7", "--output", str(tmp_path / "cam.mp4")], "Webcam 7 cannot be opened"),
        (["--input", str(tmp_path / "nothing*.png"), "--output", str(tmp_path)], "matches no"),
        (["--input", str(corrupt)], "use --output"),  # no window in headless OpenCV
        (["--input", str(corrupt), "--save-panoptic"], "needs --output"),
    ]
    for args, message in cases:
        assert demo.main(["--config-file", config_file] + args) == 1, args
        assert message in capsys.readouterr().err, args
    # A folder whose only image is unreadable: nothing processed, exit status 1.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    assert (
        demo.main(
            ["--config-file", config_file, "--input", str(tmp_path / "bad")]
            + ["--output", str(tmp_path / "o")]
        )
        == 1
    )
    assert "x.png: unreadable image" in capsys.readouterr().err


def test_ctrl_c_in_a_video_exits_130_keeping_the_partial_output(tmp_path, model_files, capsys):
    config_file, _ = model_files["small"]
    video = _write_video(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".clip.0123456789ab.tmp.mp4"  # left by an earlier, killed run
    stale.write_bytes(b"half a video")

    class InterruptedDemo(demo.VisualizationDemo):
        def run_on_video(self, frames):
            for index, result in enumerate(super().run_on_video(frames)):
                if index == 3:
                    raise KeyboardInterrupt
                yield result

    original = demo.VisualizationDemo
    demo.VisualizationDemo = InterruptedDemo
    try:
        rc = demo.main(
            ["--config-file", config_file, "--video-input", str(video), "--output", str(out)]
            + ["--save-panoptic"]
        )
    finally:
        demo.VisualizationDemo = original
    err = capsys.readouterr().err
    assert rc == 130, err
    assert f"Interrupted: '{out / 'clip.mp4'}' is partial." in err
    assert "Stopped early: interrupted" in err and "The input ended" not in err  # not truncated
    assert "clip.mp4: processed 3 frames." in err  # the 4th was read, then interrupted
    assert count_video_frames(str(out / "clip.mp4")) == 3
    # The stale temporary file is gone too.
    assert sorted(os.listdir(out)) == ["clip.mp4", "panoptic", "predictions.json"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 3
    assert predictions["info"]["partial"] == "stopped early (interrupted)"


def test_a_read_only_output_is_refused_before_the_model_is_built(
    tmp_path, model_files, read_only_folder, capsys, monkeypatch
):
    # The model was built and the first image run before writing its drawing failed with
    # "Processing '<image>' failed: PermissionError", naming the image as the fault.
    config_file, _ = model_files["small"]
    images = _write_images(tmp_path / "images")
    video = _write_video(tmp_path / "clip.mp4")

    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(demo, "VisualizationDemo", not_built)
    for inputs, output in (
        (["--input", str(images)], read_only_folder / "drawings"),
        (["--input", str(images / "a.png")], read_only_folder / "one.png"),
        (["--video-input", str(video)], read_only_folder),
    ):
        assert demo.main(["--config-file", config_file, *inputs, "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert f"error: Cannot write the --output '{output}': '{read_only_folder}' is not" in err


def test_confidence_threshold_out_of_range_is_refused(model_files, capsys):
    config_file, _ = model_files["small"]
    rc = demo.main(["--config-file", config_file, "--input", "x.png", "--output", "o"]
                   + ["--confidence-threshold", "5"])  # fmt: skip
    assert rc == 1
    assert "--confidence-threshold must be a score in [0, 1], got 5.0" in capsys.readouterr().err


def test_a_lazy_config_gives_the_yaml_twins_output(tmp_path, data_root):
    """demo.py on the quick config's LazyConfig twin: same weights, same drawings' predictions
    (COCO panoptic export, byte for byte), threshold set through either kind's keys."""
    quick = os.path.join(REPO, "configs", "Synthetic-PanopticSegmentation", "efficientps_b0_quick")
    torch.manual_seed(0)
    model = build_model(load_config(quick + ".yaml", ["MODEL.DEVICE", "cpu"]))
    AtomicDetectionCheckpointer(model, str(tmp_path)).save("weights")
    weights = str(tmp_path / "weights.pth")
    images = os.path.join(data_root, "synthetic_panoptic", "images", "val")
    outputs = {}
    for kind, opts in (
        (".yaml", ["MODEL.WEIGHTS", weights]),
        (".py", [f"train.init_checkpoint={weights}"]),
    ):
        out = tmp_path / kind.strip(".")
        args = ["--config-file", quick + kind, "--input", images, "--output", str(out)]
        args += ["--save-panoptic", "--confidence-threshold", "0.05", "--opts", *opts]
        assert demo.main(args) == 0
        outputs[kind] = json.loads((out / "predictions.json").read_text())
        for name in os.listdir(out / "panoptic"):
            outputs[kind][name] = (out / "panoptic" / name).read_bytes()
    assert outputs[".py"] == outputs[".yaml"]
    assert len(outputs[".py"]["annotations"]) == 3
    assert any(s["isthing"] for a in outputs[".py"]["annotations"] for s in a["segments_info"])
    # The threshold reached the LazyConfig's keys.
    cfg = demo.build_config(
        demo.get_parser().parse_args(
            ["--config-file", quick + ".py", "--confidence-threshold", "0.25", "--input", "x"]
        )
    )
    assert cfg.model.roi_heads.box_predictor.test_score_thresh == 0.25
    assert cfg.model.confidence_thresh == 0.25


def _three_images(folder):
    """a.png, b.png and c.png, 40x60 noise, in a new ``folder``."""
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(folder / name), rng.randint(0, 255, (40, 60, 3), np.uint8))
    return folder


def test_esc_counts_the_image_shown_and_names_those_not_shown(
    tmp_path, model_files, monkeypatch, capsys
):
    """Esc in the window after the first of three images reported "Processed 0 images" and exit
    status 1, though that image was run and shown; the two never shown went unmentioned."""
    config_file, _ = model_files["small"]
    images = _three_images(tmp_path / "images")
    shown = []
    monkeypatch.setattr(demo, "display_available", lambda: True)
    monkeypatch.setattr(cv2, "imshow", lambda window, image: shown.append(image.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: 27)  # Esc
    assert demo.main(["--config-file", config_file, "--input", str(images)]) == 0
    out = capsys.readouterr().out
    assert len(shown) == 1 and "Processed 1 images, skipped 0." in out
    b = images / "b.png"
    assert f"Stopped at '{b}': it and the images after it (2 in all) were not processed" in out


def test_an_error_at_an_image_names_it_and_labels_the_partial_export(tmp_path, model_files, capsys):
    """A model error at the second of three images ended in "error: <message>" naming no image,
    and left a predictions.json of the first image alone, nowhere said to be partial."""
    config_file, _ = model_files["small"]
    images = _three_images(tmp_path / "images")
    out = tmp_path / "out"
    errors = iter([RuntimeError("CUDA out of memory"), IndexError("index 7 is out of bounds")])

    class FailingDemo(demo.VisualizationDemo):
        calls = 0

        def run_on_image(self, image):
            FailingDemo.calls += 1
            if FailingDemo.calls == 2:
                raise next(errors)
            return super().run_on_image(image)

    original = demo.VisualizationDemo
    demo.VisualizationDemo = FailingDemo
    try:
        args = ["--config-file", config_file, "--input", str(images), "--output", str(out)]
        rc = demo.main(args + ["--save-panoptic"])
        err = capsys.readouterr().err
        assert rc == 1, err
        b = images / "b.png"
        assert f"error: Processing '{b}' failed: RuntimeError: CUDA out of memory" in err
        assert f"Stopped at '{b}': it and the images after it (2 in all) were not processed" in err
        assert (
            "PARTIAL COCO panoptic predictions (only the 1 images processed before the stop)" in err
        )
        assert "Traceback" not in err
        predictions = json.loads((out / "predictions.json").read_text())
        assert [a["image_id"] for a in predictions["annotations"]] == ["a"]
        assert predictions["info"]["partial"].startswith(f"stopped at '{b}': holds the 1 images")
        assert sorted(os.listdir(out)) == ["a.png", "panoptic", "predictions.json"]
        # A fault of the code keeps its traceback; a full rerun drops the label.
        FailingDemo.calls = 0
        assert demo.main(args) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "IndexError: index 7 is out of bounds" in err
        assert f"error: Processing '{b}' failed: IndexError" in err
        assert demo.main(args + ["--save-panoptic"]) == 0
        assert "partial" not in json.loads((out / "predictions.json").read_text())["info"]
    finally:
        demo.VisualizationDemo = original


def test_unique_stems_number_shared_names_and_keep_a_repeated_path_s_first_name():
    from efficientps_d2.demo.runner import unique_stems

    paths = ["x/a.jpg", "y/a.png", "x/a.jpg", "x/b.jpg"]
    assert unique_stems(paths) == {"x/a.jpg": "a", "y/a.png": "a_1", "x/b.jpg": "b"}
