"""Export to TorchScript and ONNX: the exported model's panoptic output equals the eager model's on
images of several sizes (other than the traced one), with and without detections; PQ on the
synthetic validation images, of a random model and of a briefly trained quick one; the export
tool, demo.py --exported and clear errors."""

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data import transforms as T
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from detectron2.modeling import build_model

import demo
from efficientps_d2 import setup_cfg
from efficientps_d2.data import EfficientPSDatasetMapper, register_panoptic_dataset
from efficientps_d2.data.synthetic import register_synthetic
from efficientps_d2.demo import CocoPanopticWriter
from efficientps_d2.engine import load_config
from efficientps_d2.export import (
    FORMAT_VERSION,
    OUTPUT_NAMES,
    EfficientPSGraph,
    export_model,
    load,
    postprocess,
)
from efficientps_d2.export.exporter import resize_for_export
from efficientps_d2.solver import build_optimizer
from efficientps_d2.tools import export as export_tool
from tests.common import tiny_config

# ONNX is optional (scripts/setup_env.sh installs it): without it only TorchScript is tested.
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
BACKENDS = [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason="onnxruntime missing")),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "test_export_synthetic"
QUICK_CONFIG = "configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml"
THRESH = 0.6
# (height, width) of the network input, and the output size asked for (None: the same).
SIZES = [((80, 112), None), ((71, 133), None), ((128, 96), (64, 48)), ((128, 192), None)]
# A uniform grey image that the calibrated model below detects nothing in (best score ~0.44).
EMPTY_VALUE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The first 3 images of the synthetic validation split (same generator, 128 x 192)."""
    root = tmp_path_factory.mktemp("datasets")
    register_synthetic(str(root), prefix=DATASET, num_train=1, num_val=3)
    return f"{DATASET}_val"


@pytest.fixture(scope="module")
def cfg(dataset):
    opts = ["DATASETS.TEST", (dataset,), "MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", []]
    opts += ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6, "MODEL.ROI_HEADS.NUM_CLASSES", 3]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", THRESH]
    opts += ["MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH", THRESH]
    opts += ["MODEL.PANOPTIC_FUSION.STUFF_AREA_LIMIT", 0, "DATALOADER.NUM_WORKERS", 0]
    return tiny_config(opts)


@pytest.fixture(scope="module")
def model(cfg):
    """A randomly initialised model whose box classifier is scaled up so that its scores spread
    over 0..1: some detections pass THRESH on most images, none on a uniform grey one."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=300.0)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, cfg, model):
    """{"torchscript": folder (written by the export tool), "onnx": folder (export_model)}."""
    work = tmp_path_factory.mktemp("export")
    DetectionCheckpointer(model, str(work)).save("weights")
    config_file = work / "tiny.yaml"
    config_file.write_text(cfg.dump())
    sample = work / "sample.png"
    cv2.imwrite(str(sample), np.random.RandomState(0).randint(0, 256, (96, 128, 3), np.uint8))
    args = ["--config-file", str(config_file), "--format", "torchscript"]
    args += ["--output", str(work / "ts"), "--sample-image", str(sample)]
    assert export_tool.main(args + ["MODEL.WEIGHTS", str(work / "weights.pth")]) == 0
    # Traced on 96 x 128: none of SIZES.
    image = torch.as_tensor(cv2.imread(str(sample))[:, :, ::-1].transpose(2, 0, 1).copy()).float()
    folders = {"torchscript": str(work / "ts")}
    if HAVE_ONNX:
        folders["onnx"] = export_model(model, cfg, str(work / "onnx"), "onnx", sample_image=image)
        folders["onnx"] = os.path.dirname(folders["onnx"])
    return folders


def _image(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


def _assert_matches(eager, exported):
    """Same segment id on >= 99.9% of pixels, same segments and classes, same detections."""
    seg_e, info_e = eager["panoptic_seg"]
    seg_x, info_x = exported["panoptic_seg"]
    assert seg_x.dtype == torch.int32 and seg_x.shape == seg_e.shape
    assert (seg_e == seg_x).float().mean().item() >= 0.999
    key = [(s["id"], s["isthing"], s["category_id"]) for s in info_e]
    assert key == [(s["id"], s["isthing"], s["category_id"]) for s in info_x]
    assert eager["sem_seg"].shape == exported["sem_seg"].shape
    torch.testing.assert_close(exported["sem_seg"], eager["sem_seg"], rtol=1e-3, atol=1e-3)
    ie, ix = eager["instances"], exported["instances"]
    assert ie.image_size == ix.image_size and len(ie) == len(ix)
    assert torch.equal(ie.pred_classes, ix.pred_classes)
    torch.testing.assert_close(ix.scores, ie.scores, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ix.pred_boxes.tensor, ie.pred_boxes.tensor, rtol=1e-3, atol=1e-2)
    if len(ie):
        assert (ie.pred_masks == ix.pred_masks).float().mean().item() >= 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_output_matches_eager_on_other_sizes(model, exports, backend):
    exported = load(exports[backend])
    assert exported.backend == backend
    things = 0
    for seed, (size, output) in enumerate(SIZES):
        inputs = {"image": _image(*size, seed)}
        if output:
            inputs.update(height=output[0], width=output[1])
        with torch.no_grad():
            eager = model([inputs])[0]
        got = exported([inputs])[0]
        assert got["panoptic_seg"][0].shape == tuple(output or size)
        _assert_matches(eager, got)
        things += sum(s["isthing"] for s in got["panoptic_seg"][1])
    assert things > 0  # the comparison covered thing segments, not only stuff


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_without_detections(model, exports, backend):
    inputs = {"image": torch.full((3, 80, 112), EMPTY_VALUE, dtype=torch.uint8)}
    with torch.no_grad():
        eager = model([inputs])[0]
    got = load(exports[backend])([inputs])[0]
    assert len(eager["instances"]) == len(got["instances"]) == 0
    assert got["instances"].pred_masks.shape == (0, 80, 112)
    assert all(not s["isthing"] for s in got["panoptic_seg"][1])
    _assert_matches(eager, got)


def test_pq_on_synthetic_val_equals_eager(cfg, model, exports, dataset, tmp_path):
    """PQ on the first 3 synthetic validation images (a subset of synthetic_panoptic_val, to stay
    fast), against their real ground truth and against the eager model's own predictions written
    as ground truth. The untrained model scores PQ ~0 on the former, so the latter is the strict
    check: eager scores 100 there and the exports must be within 0.1 of it."""
    loader = build_detection_test_loader(cfg, dataset, mapper=DatasetMapper(cfg, is_train=False))
    runners = [("eager", model)] + [(b, load(p)) for b, p in exports.items()]

    own = f"{DATASET}_eager_predictions"
    writer = CocoPanopticWriter(
        str(tmp_path / "own.json"), str(tmp_path / "own"), MetadataCatalog.get(dataset)
    )
    for batch in loader:
        with torch.no_grad():
            output = model(batch)[0]
        x = batch[0]
        stem = os.path.splitext(os.path.basename(x["file_name"]))[0]
        writer.add(
            stem, os.path.basename(x["file_name"]), *output["panoptic_seg"], x["height"], x["width"]
        )
    writer.write_json()
    register_panoptic_dataset(
        own,
        image_root=os.path.dirname(x["file_name"]),
        panoptic_root=str(tmp_path / "own"),
        panoptic_json=str(tmp_path / "own.json"),
    )
    try:
        pq = {}
        for data in (dataset, own):
            loader = build_detection_test_loader(
                cfg, data, mapper=DatasetMapper(cfg, is_train=False)
            )
            for name, runner in runners:
                evaluator = COCOPanopticEvaluator(data, str(tmp_path / data / name))
                pq[data, name] = inference_on_dataset(runner, loader, evaluator)["panoptic_seg"][
                    "PQ"
                ]
    finally:
        DatasetCatalog.remove(own)
        MetadataCatalog.remove(own)
    assert pq[own, "eager"] == pytest.approx(100.0)
    for data in (dataset, own):
        for backend in exports:
            assert abs(pq[data, backend] - pq[data, "eager"]) <= 0.1, pq


def test_a_briefly_trained_quick_model_scores_the_same_pq_exported(tmp_path):
    """The quick synthetic config, trained 40 iterations, exported to both formats: PQ on the 50
    images of synthetic_panoptic_val (regenerated here: same generator and seed) within 0.1 of
    eager. Test thresholds at 0.1, so that the young detector's instances enter the fusion."""
    register_synthetic(str(tmp_path / "data"), prefix=f"{DATASET}_quick", num_train=32, num_val=50)
    opts = [
        "DATASETS.TRAIN",
        (f"{DATASET}_quick_train",),
        "DATASETS.TEST",
        (f"{DATASET}_quick_val",),
    ]
    opts += ["SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 0, "MODEL.DEVICE", "cpu"]
    opts += [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        0.1,
        "MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH",
        0.1,
    ]
    cfg = setup_cfg(os.path.join(REPO, QUICK_CONFIG), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    loader = build_detection_train_loader(cfg, mapper=EfficientPSDatasetMapper(cfg, True))
    SimpleTrainer(model, loader, build_optimizer(cfg, model)).train(0, 40)
    model.eval()

    runners = [("eager", model)]
    for backend in ["torchscript"] + (["onnx"] if HAVE_ONNX else []):
        path = export_model(model, cfg, str(tmp_path / backend), backend)
        runners.append((backend, load(os.path.dirname(path))))
    val = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, val, mapper=EfficientPSDatasetMapper(cfg, False))
    results = {}
    for name, runner in runners:
        evaluator = COCOPanopticEvaluator(val, str(tmp_path / "eval" / name))
        results[name] = inference_on_dataset(runner, loader, evaluator)["panoptic_seg"]
    assert results["eager"]["PQ_th"] > 0  # instances took part
    for name, result in results.items():
        assert abs(result["PQ"] - results["eager"]["PQ"]) <= 0.1, results


def test_postprocess_of_graph_outputs_is_the_eager_output():
    """The runtime's glue (resize, fusion, class ids) on the untraced graph equals the eager model,
    with thing classes that are not semantic classes 0..T-1 (here 3, 4)."""
    cfg = tiny_config(["MODEL.PANOPTIC_FUSION.STUFF_AREA_LIMIT", 0])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH = THRESH
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=300.0)
    torch.nn.init.constant_(model.roi_heads.mask_head.predictor.bias, 2.0)  # things win pixels
    graph = EfficientPSGraph(model).eval()
    fusion = {k: getattr(model, k) for k in ("overlap_thresh", "stuff_area_limit")}
    fusion.update(confidence_thresh=THRESH, mask_logit_scale=model.mask_logit_scale)
    image = _image(72, 100, seed=0)
    with torch.no_grad():
        eager = model([{"image": image, "height": 36, "width": 50}])[0]
        got = postprocess(*graph(image.float()), 36, 50, thing_semantic_ids=[3, 4], **fusion)
    assert any(s["isthing"] for s in got["panoptic_seg"][1])
    assert set(got["instances"].pred_classes.tolist()) <= {3, 4}
    _assert_matches(eager, got)


def test_manifest_describes_the_runtime(exports, cfg, dataset):
    with open(os.path.join(exports["torchscript"], "efficientps_export.json")) as f:
        manifest = json.load(f)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["backend"] == "torchscript"
    assert manifest["thing_semantic_ids"] == [0, 1, 2]
    assert manifest["is_thing"] == [True, True, True, False, False, False]
    assert manifest["metadata"]["stuff_classes"] == MetadataCatalog.get(dataset).stuff_classes
    assert manifest["input_format"] == "RGB" and manifest["size_divisibility"] == 32
    assert manifest["pixel_mean"] == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))
    assert manifest["fusion"]["confidence_thresh"] == THRESH


def test_torchscript_graph_has_its_batch_norms_folded(model, exports):
    """As the eager model's default inference path: one op fewer per conv at deployment (ONNX
    export folds them by itself)."""
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    ts = torch.jit.load(os.path.join(exports["torchscript"], "model.ts"))
    assert "aten::_convolution" in str(ts.inlined_graph)
    assert "batch_norm" not in str(ts.inlined_graph)


def test_torchscript_runs_without_efficientps_d2(exports):
    """torch.jit.load + torchvision alone run the graph: no model code, config or registry."""
    script = (
        "import sys, torch, torchvision\n"
        f"m = torch.jit.load({os.path.join(exports['torchscript'], 'model.ts')!r})\n"
        "out = m(torch.rand(3, 75, 101) * 255)\n"
        "assert out[0].shape == (6, 75, 101) and out[1].shape[1] == 4, [o.shape for o in out]\n"
        "assert not [k for k in sys.modules if k.startswith(('efficientps_d2', 'detectron2'))]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd="/", env=env, timeout=300)


def test_demo_runs_an_export(exports, tmp_path):
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.random.RandomState(1).randint(0, 256, (90, 140, 3), np.uint8))
    for backend, folder in exports.items():
        out = tmp_path / backend
        args = ["--exported", folder, "--input", str(image), "--output", str(out)]
        assert demo.main(args + ["--save-panoptic"]) == 0
        assert cv2.imread(str(out / "in.png")).shape == (90, 140, 3)
        with open(out / "predictions.json") as f:
            assert len(json.load(f)["annotations"]) == 1
    args = ["--exported", exports["torchscript"], "--input", str(image), "--output", str(tmp_path)]
    assert demo.main(args + ["--confidence-threshold", "0.3"]) == 1


def test_bad_artifacts_are_named(exports, tmp_path):
    with pytest.raises(ValueError, match="no efficientps_export.json"):
        load(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "missing"))
    for backend, folder in exports.items():
        copy = tmp_path / backend
        shutil.copytree(folder, copy)
        manifest_file = copy / "efficientps_export.json"
        manifest = json.loads(manifest_file.read_text())
        model_file = copy / manifest["model_file"]
        model_file.write_bytes(b"not a model")
        with pytest.raises(ValueError, match=f"{model_file.name}' is not a loadable"):
            load(str(copy))
        model_file.unlink()
        with pytest.raises(ValueError, match="lacks its model file"):
            load(str(copy))
        shutil.copy(os.path.join(folder, manifest["model_file"]), model_file)
        manifest_file.write_text(json.dumps(dict(manifest, format_version=FORMAT_VERSION + 1)))
        with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
            load(str(copy))
        manifest_file.write_text(json.dumps(dict(manifest, format="something else")))
        with pytest.raises(ValueError, match="is not an EfficientPS export description"):
            load(str(copy / manifest["model_file"]))
        manifest_file.write_text(json.dumps({k: v for k, v in manifest.items() if k != "fusion"}))
        with pytest.raises(ValueError, match=r"efficientps_export.json' lacks \['fusion'\]"):
            load(str(copy))
        manifest_file.write_text(json.dumps(dict(manifest, backend="tensorrt")))
        with pytest.raises(ValueError, match="names backend 'tensorrt'; expected one of"):
            load(str(copy))
        manifest_file.write_text(json.dumps(manifest))
        (copy / "notes.txt").write_text("not the model")  # a file of the folder, not the export's
        with pytest.raises(ValueError, match=r"notes.txt' is not part of the EfficientPS export"):
            load(str(copy / "notes.txt"))
        manifest_file.write_text("{broken")
        with pytest.raises(ValueError, match="not a readable export description"):
            load(str(copy))


def test_unsupported_exports_say_what_and_why(cfg, model, tmp_path, capsys):
    with pytest.raises(ValueError, match="Unknown export format 'tflite'"):
        export_model(model, cfg, str(tmp_path / "a"), "tflite")
    with pytest.raises(ValueError, match="eval mode"):
        export_model(model.train(), cfg, str(tmp_path / "a"), "torchscript")
    model.eval()
    with pytest.raises(TypeError, match="Only EfficientPS"):
        export_model(torch.nn.Linear(1, 1), cfg, str(tmp_path / "a"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder"):
        export_model(model, cfg, str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    base = ["--config-file", str(config_file), "--format", "torchscript"]
    base += ["--output", str(tmp_path / "o")]
    assert export_tool.main(base + ["TEST.AUG.ENABLED", "True"]) == 1
    assert "test-time augmentation" in capsys.readouterr().err
    assert export_tool.main(base + ["MODEL.MASK_ON", "False"]) == 1
    assert "MODEL.MASK_ON" in capsys.readouterr().err
    assert export_tool.main(base + ["--sample-image", str(config_file)]) == 1
    assert "not a readable image" in capsys.readouterr().err
    lazy = ["--config-file", QUICK_CONFIG[: -len(".yaml")] + ".py"] + base[2:]
    assert export_tool.main(lazy + ["train.tta.enabled=True"]) == 1
    assert "train.tta.enabled is True" in capsys.readouterr().err
    assert export_tool.main(lazy + ["model.input_format=YUV"]) == 1
    assert "model.input_format must be 'RGB' or 'BGR'" in capsys.readouterr().err
    # Another meta-architecture, as MODEL.META_ARCHITECTURE: refused before it is built.
    assert export_tool.main(lazy + ["model._target_=detectron2.modeling.PanopticFPN"]) == 1
    err = capsys.readouterr().err
    assert "model._target_ is PanopticFPN: only EfficientPS models can be exported" in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders


def test_a_lazy_config_exports_what_its_yaml_twin_exports(tmp_path):
    """The quick config's LazyConfig twin, given the same weights (train.init_checkpoint), exports
    the same description and a graph with the same outputs as the YAML config."""
    torch.manual_seed(0)
    yaml_cfg = setup_cfg(os.path.join(REPO, QUICK_CONFIG), ["MODEL.DEVICE", "cpu"])
    DetectionCheckpointer(build_model(yaml_cfg), str(tmp_path)).save("weights")
    weights = str(tmp_path / "weights.pth")
    common = ["--format", "torchscript", "--output"]
    yaml_args = ["--config-file", QUICK_CONFIG] + common + [str(tmp_path / "yaml")]
    assert export_tool.main(yaml_args + ["MODEL.WEIGHTS", weights]) == 0
    lazy_config = QUICK_CONFIG[: -len(".yaml")] + ".py"
    lazy_args = ["--config-file", lazy_config] + common + [str(tmp_path / "lazy")]
    assert export_tool.main(lazy_args + [f"train.init_checkpoint={weights}"]) == 0

    manifests = {}
    for kind in ("yaml", "lazy"):
        with open(tmp_path / kind / "efficientps_export.json") as f:
            manifests[kind] = json.load(f)
    assert manifests["lazy"] == manifests["yaml"]
    assert (manifests["lazy"]["min_size_test"], manifests["lazy"]["max_size_test"]) == (128, 192)
    image = _image(128, 192, seed=3).float()
    outputs = {kind: torch.jit.load(str(tmp_path / kind / "model.ts"))(image) for kind in manifests}
    for name, a, b in zip(OUTPUT_NAMES, outputs["yaml"], outputs["lazy"]):
        assert torch.equal(a, b), name


def test_the_recorded_test_resizing_is_one_the_runtime_can_redo():
    """A LazyConfig's test augmentations become the export's resize, or are refused by name."""
    lazy = load_config(QUICK_CONFIG[: -len(".yaml")] + ".py", ["train.device=cpu"])
    assert resize_for_export(lazy) == (128, 192)
    yaml_cfg = setup_cfg(os.path.join(REPO, QUICK_CONFIG), ["INPUT.MIN_SIZE_TEST", 0])
    assert resize_for_export(yaml_cfg) == (0, 192)  # 0: the predictor does not resize
    lazy.dataloader.test.mapper.augmentations = []
    assert resize_for_export(lazy) == (0, 0)
    lazy.dataloader.test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192),
        L(T.RandomFlip)(),
    ]
    with pytest.raises(ValueError, match="dataloader.test.mapper.augmentations"):
        resize_for_export(lazy)
    lazy.dataloader.test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(96, 128), max_size=192)
    ]
    with pytest.raises(ValueError, match="single short edge length"):
        resize_for_export(lazy)


def test_a_re_export_never_deletes_files_that_are_not_the_export(cfg, model, exports, tmp_path):
    """An export replaces its whole folder: one that also holds other files (here the weights
    being exported) is refused, naming them, before any tracing, and left as it was."""
    folder = tmp_path / "exported"
    shutil.copytree(exports["torchscript"], folder)
    (folder / "model_final.pth").write_bytes(b"the trained weights")
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match=r"other files too \['model_final.pth'\]"):
        export_model(model, cfg, str(folder), "torchscript")
    assert sorted(os.listdir(folder)) == before
    assert (folder / "model_final.pth").read_bytes() == b"the trained weights"


def test_weights_that_leave_tensors_random_are_not_exported(cfg, model, tmp_path, capsys):
    """A checkpoint without the ROI heads (here cut out of the module's model's) is refused, as
    --eval-only refuses it, naming the missing tensors; MODEL.ALLOW_PARTIAL_WEIGHTS opts in."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.")}
    torch.save({"model": state}, tmp_path / "partial.pth")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    args = ["--config-file", str(config_file), "--format", "torchscript"]
    args += ["--output", str(tmp_path / "out"), "MODEL.WEIGHTS", str(tmp_path / "partial.pth")]
    assert export_tool.main(args) == 1
    err = capsys.readouterr().err
    assert "partial.pth' lacks" in err and "roi_heads.box_predictor" in err, err
    assert "MODEL.ALLOW_PARTIAL_WEIGHTS" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_fails_before_the_trace(cfg, model, tmp_path, monkeypatch):
    """A folder under a file is refused by name; one whose parent cannot be written to fails on
    making the export's workspace. Both before any tracing (minutes for B5 at full size)."""

    def trace(*args):
        raise AssertionError("traced before the output folder was known to be writable")

    monkeypatch.setattr("efficientps_d2.export.exporter._trace", trace)
    (tmp_path / "notes.txt").write_text("a file")
    notes = tmp_path / "notes.txt"
    with pytest.raises(ValueError) as error:
        export_model(model, cfg, str(notes / "exported"), "torchscript")
    assert str(error.value) == (
        f"Cannot make the --output '{notes / 'exported'}': '{notes}' is not a folder."
    )
    with pytest.raises(ValueError, match=f"The --output '{notes}' is a file, not a folder"):
        export_model(model, cfg, str(notes), "torchscript")

    read_only = str(tmp_path / "read-only")
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # as under a folder without write permission (not as root)
        if os.path.dirname(os.path.abspath(path)) == read_only:
            raise PermissionError(13, "Permission denied", path)
        return real_mkdir(path, *args, **kwargs)

    real_mkdir(read_only)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(PermissionError):
        export_model(model, cfg, os.path.join(read_only, "exported"), "torchscript")


def test_the_tool_refuses_a_read_only_output_before_building_the_model(
    cfg, tmp_path, read_only_folder, monkeypatch, capsys
):
    # The export's folder is written next to --output: a read-only folder above it failed with
    # a bare "Permission denied" on a temporary name, after the model was built and loaded.
    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr("efficientps_d2.config_adapter.ConfigAdapter.build_model", not_built)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    args = ["--config-file", str(config_file), "--format", "torchscript", "--output"]
    writable = tmp_path / "exported"
    writable.mkdir()
    (writable / "efficientps_export.json").write_text("{}")  # an export, to be replaced
    for output in (read_only_folder / "exported", read_only_folder):
        assert export_tool.main(args + [str(output)]) == 1
        err = capsys.readouterr().err
        assert f"Cannot write the --output '{output}': '{read_only_folder}' is not" in err
    read_only_folder.chmod(0o755)
    shutil.move(str(writable), str(read_only_folder / "exported"))  # writable, under read-only
    read_only_folder.chmod(0o555)
    assert export_tool.main(args + [str(read_only_folder / "exported")]) == 1
    assert f"'{read_only_folder}' is not writable" in capsys.readouterr().err


def test_a_re_export_removes_what_a_killed_export_left(cfg, model, exports, tmp_path):
    """A killed export leaves its hidden workspace next to the folder; the next export to that
    folder removes it (and replaces the old export), leaving those of other folders alone."""
    folder = tmp_path / "exported"
    shutil.copytree(exports["torchscript"], folder)
    stale = tmp_path / ".exported.0123456789ab.tmp"
    (stale / "new").mkdir(parents=True)
    (stale / "new" / "model.ts").write_bytes(b"half written")
    other = tmp_path / ".elsewhere.0123456789ab.tmp"
    other.mkdir()
    export_model(model, cfg, str(folder), "torchscript")
    assert sorted(os.listdir(tmp_path)) == [other.name, "exported"]
    assert sorted(os.listdir(folder)) == ["efficientps_export.json", "model.ts"]


def test_onnx_export_without_onnx_fails_before_the_trace(cfg, model, tmp_path, monkeypatch):
    def trace(*args):
        raise AssertionError("traced before onnx was found missing")

    monkeypatch.setattr("efficientps_d2.export.exporter._trace", trace)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ImportError, match="pip install onnx onnxruntime"):
        export_model(model, cfg, str(tmp_path / "exported"), "onnx")
    assert os.listdir(tmp_path) == []


def test_a_model_file_of_another_export_is_refused(exports, tmp_path):
    """The module's graph (6 classes, 3 things) given another export's description (5 classes,
    2 things, as a model file copied between export folders would be): refused by name instead
    of fused with the wrong classes."""
    folder = tmp_path / "mixed"
    shutil.copytree(exports["torchscript"], folder)
    manifest_file = folder / "efficientps_export.json"
    manifest = json.loads(manifest_file.read_text())
    manifest.update(num_classes=5, thing_semantic_ids=[3, 4], is_thing=[False] * 3 + [True] * 2)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"model.ts' does not fit its efficientps_export.json"):
        load(str(folder))([{"image": _image(64, 96, seed=0)}])


def test_an_inference_dtype_that_the_export_does_not_keep_is_reported(
    cfg, model, tmp_path, monkeypatch
):
    """The graph is traced in float32: a model that infers in bfloat16 gives other outputs, so
    the export says so (before the trace, stopped here) rather than claim the eager results."""

    class Stop(Exception):
        pass

    def trace(*args):
        raise Stop

    monkeypatch.setattr("efficientps_d2.export.exporter._trace", trace)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # a handler of its own: the logger may not propagate to root
    logger = logging.getLogger("efficientps_d2.export.exporter")
    logger.addHandler(handler)
    options = model.inference_options
    try:
        for dtype in ("float32", "bfloat16"):
            model.inference_options = dataclasses.replace(options, dtype=dtype)
            with pytest.raises(Stop):
                export_model(model, cfg, str(tmp_path / "exported"), "torchscript")
    finally:
        model.inference_options = options
        logger.removeHandler(handler)
    assert len(records) == 1 and "INFERENCE_DTYPE" in records[0].getMessage()
    assert "exported graph runs in float32" in records[0].getMessage()


def test_a_sample_image_too_thin_to_trace_is_named(cfg, tmp_path, capsys):
    """Checked as the demo checks its inputs, naming the file and its size before and after the
    test resize (it was "height and width must be > 0", or the resized size alone)."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    args = ["--config-file", str(config_file), "--format", "torchscript"]
    args += ["--output", str(tmp_path / "out"), "--sample-image"]
    resize = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]
    for height, width, message in [
        (
            3,
            400,
            r"'.*3x400.png' is 3 x 400, 1 x 192 after the test resize: tracing needs at least",
        ),
        (1, 2000, r"'.*1x2000.png': A 1 x 2000 image cannot go through the test-time resize"),
    ]:
        image = str(tmp_path / f"{height}x{width}.png")
        cv2.imwrite(image, np.zeros((height, width, 3), np.uint8))
        assert export_tool.main(args + [image] + resize) == 1
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_inputs_the_exported_model_cannot_take_are_named(exports):
    """As the eager model: a dict or a tensor instead of a list of dicts, a dict without "image",
    an (H, W, 3) or gray image; refused naming the input, before any image of the batch runs (it
    was a TypeError "string indices must be integers", an IndexError or a KeyError)."""
    exported = load(exports["torchscript"])
    assert exported.eval() is exported and exported.train(False) is exported
    with pytest.raises(ValueError, match="runs inference only"):
        exported.train()
    runs = []
    exported._run = lambda image: runs.append(image)
    image = _image(64, 96, seed=0)
    with pytest.raises(ValueError, match="takes a list of input dicts.*got a dict"):
        exported({"image": image})
    with pytest.raises(ValueError, match="takes a list of input dicts.*got a Tensor"):
        exported(image)
    for bad, got in [
        (image, "NoneType"),
        ({"img": image}, "NoneType"),
        ({"image": image.permute(1, 2, 0)}, r"a Tensor of shape \(64, 96, 3\)"),
        ({"image": image[:1]}, r"a Tensor of shape \(1, 64, 96\)"),
    ]:
        with pytest.raises(ValueError, match=rf"batched_inputs\[1\]\['image'\] .*, got {got}"):
            exported([{"image": image}, bad])
    # An image without pixels, an output size of 0 (it gave the input's size) or 40.5 (truncated).
    with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['image'\] has no pixels"):
        exported([{"image": image}, {"image": image[:, :0]}])
    for size in (0, 40.5):
        with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['height'\] is the output"):
            exported([{"image": image}, {"image": image, "height": size}])
    assert runs == []
