import json
import os
import re
import shutil

import detectron2.utils.comm as comm
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.structures import Boxes, Instances
from pycocotools import mask as mask_util

from efficientps_d2.data import register_panoptic_dataset, synthetic
from efficientps_d2.data.synthetic import ensure_synthetic_panoptic
from efficientps_d2.evaluation import (
    PanopticEvaluator,
    PanopticSemSegEvaluator,
    ThingCOCOEvaluator,
    build_dataset_evaluator,
    build_evaluator,
    panoptic_to_semantic,
)
from tests.common import load_config
from tests.fixtures import write_panoptic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    files = write_panoptic_dataset(str(root), num_images=2)
    name = "__efficientps_test_evaluation"
    register_panoptic_dataset(
        name,
        image_root=files["image_root"],
        panoptic_root=files["panoptic_root"],
        panoptic_json=files["panoptic_json"],
    )
    return name


def ground_truth_as_predictions(name):
    """Model-style outputs that reproduce each record's ground truth exactly."""
    meta = MetadataCatalog.get(name)
    inputs, outputs = [], []
    for record in DatasetCatalog.get(name):
        labels = panoptic_to_semantic(record["pan_seg_file_name"], record["segments_info"], 255)
        num_classes = len(meta.stuff_classes)
        sem_seg = torch.nn.functional.one_hot(torch.as_tensor(labels).clamp(max=num_classes), 256)
        sem_seg = sem_seg[..., :num_classes].permute(2, 0, 1).float()
        from panopticapi.utils import rgb2id
        from PIL import Image

        ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        segments = [
            {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
            for s in record["segments_info"]
        ]
        inputs.append({"file_name": record["file_name"], "image_id": record["image_id"]})
        outputs.append(
            {"sem_seg": sem_seg, "panoptic_seg": (torch.as_tensor(ids.astype(np.int32)), segments)}
        )
    return inputs, outputs


def test_panoptic_to_semantic_labels_segments_and_voids(dataset):
    record = DatasetCatalog.get(dataset)[0]
    labels = panoptic_to_semantic(record["pan_seg_file_name"], record["segments_info"], 255)
    from panopticapi.utils import rgb2id
    from PIL import Image

    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    assert (labels[ids == 0] == 255).all()  # void
    for s in record["segments_info"]:
        assert (labels[ids == s["id"]] == s["category_id"]).all()


def test_semantic_evaluator_scores_ground_truth_perfectly(dataset, tmp_path):
    evaluator = PanopticSemSegEvaluator(dataset, distributed=False, output_dir=str(tmp_path))
    evaluator.reset()
    evaluator.process(*ground_truth_as_predictions(dataset))
    results = evaluator.evaluate()["sem_seg"]
    assert results["mIoU"] == pytest.approx(100.0) and results["pACC"] == pytest.approx(100.0)


def test_detectron2s_evaluator_files_are_replaced_whole(dataset, tmp_path, monkeypatch):
    # SemSegEvaluator (and COCOEvaluator) wrote their files in place, one after the other: an
    # interrupt or kill left the first new and the second old, or one cut short.
    out = tmp_path / "eval"

    def evaluate():
        evaluator = PanopticSemSegEvaluator(dataset, distributed=False, output_dir=str(out))
        evaluator.reset()
        inputs, outputs = ground_truth_as_predictions(dataset)
        evaluator.process(inputs[:n], outputs[:n])
        return evaluator.evaluate()

    n = 1
    evaluate()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"sem_seg_predictions.json", "sem_seg_evaluation.pth"}

    def cut_short(obj, f, *args, **kwargs):  # sem_seg_evaluation.pth, written last
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    n = 2  # another evaluation: other predictions
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    killed = out / ".sem_seg_predictions.0123456789ab.tmp.json"  # what a kill left
    killed.mkdir()
    evaluate()
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert (out / "sem_seg_predictions.json").read_bytes() != before["sem_seg_predictions.json"]


def test_build_evaluator_follows_the_evaluator_type(dataset, tmp_path):
    cfg = load_config()
    evaluators = build_evaluator(cfg, dataset, str(tmp_path))._evaluators
    assert [type(e) for e in evaluators] == [PanopticEvaluator, PanopticSemSegEvaluator]
    MetadataCatalog.get("__efficientps_test_not_panoptic").set(evaluator_type="sem_seg")
    with pytest.raises(NotImplementedError, match="__efficientps_test_not_panoptic.*sem_seg"):
        build_evaluator(cfg, "__efficientps_test_not_panoptic")
    # The refusals and messages of the data check's check_evaluator_types (check_evaluable).
    with pytest.raises(ValueError, match=re.escape(f"2 data sets {[dataset, dataset]}, but")):
        build_dataset_evaluator([dataset, dataset], str(tmp_path))


def _one_name_in_two_folders(root):
    """A data set of two images named "same.png", in folders "a" and "b"; returns its files."""
    files = write_panoptic_dataset(root, num_images=2)
    with open(files["panoptic_json"]) as f:
        data = json.load(f)
    for folder, image in zip("ab", data["images"]):
        os.makedirs(os.path.join(files["image_root"], folder))
        shutil.move(
            os.path.join(files["image_root"], image["file_name"]),
            os.path.join(files["image_root"], folder, "same.png"),
        )
        image["file_name"] = f"{folder}/same.png"
    with open(files["panoptic_json"], "w") as f:
        json.dump(data, f)
    return {k: files[k] for k in ("image_root", "panoptic_root", "panoptic_json")}


def test_images_of_one_name_in_two_folders_are_scored_each_against_its_own_png(tmp_path):
    # Detectron2 named both predictions "same.png": one overwrote the other, and ground truth
    # given as the prediction scored PQ 94.
    name = "__efficientps_test_evaluation_same_names"
    register_panoptic_dataset(name, **_one_name_in_two_folders(str(tmp_path)))
    out = tmp_path / "out"
    (out / "panoptic").mkdir(parents=True)
    (out / "panoptic" / "old.png").write_bytes(b"of an earlier evaluation")
    (out / ".panoptic.0123456789ab.tmp").mkdir()  # what a killed evaluation left
    try:
        evaluator = build_evaluator(
            load_config(opts=["TEST.KEEP_PANOPTIC_PNGS", True]), name, str(out)
        )._evaluators[0]
        evaluator.reset()
        evaluator.process(*ground_truth_as_predictions(name))
        results = evaluator.evaluate()["panoptic_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["PQ"] == pytest.approx(100.0)
    # The kept PNGs: this evaluation's, one per image, named in predictions.json.
    with open(out / "predictions.json") as f:
        names = [a["file_name"] for a in json.load(f)["annotations"]]
    assert sorted(names) == sorted(os.listdir(out / "panoptic")) == ["same_1.png", "same_2.png"]
    assert not (out / ".panoptic.0123456789ab.tmp").exists()


def test_predictions_json_is_written_once(dataset, tmp_path, monkeypatch):
    # It was serialised twice: once in place, once by Detectron2 into its temporary folder.
    dumps = []

    def counting_dumps(*args, **kwargs):
        dumps.append(args[0])
        return json_dumps(*args, **kwargs)

    json_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", counting_dumps)
    out = tmp_path / "out"
    evaluator = PanopticEvaluator(dataset, str(out), png_dir=str(out / "panoptic"))
    evaluator.reset()
    evaluator.process(*ground_truth_as_predictions(dataset))
    assert evaluator.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert [d["annotations"][0]["file_name"] for d in dumps] == ["img_000.png"]  # one json
    assert sorted(os.listdir(out)) == ["panoptic", "predictions.json"]  # no temporaries left
    with open(out / "predictions.json") as f:
        names = [a["file_name"] for a in json.load(f)["annotations"]]
    assert names == sorted(os.listdir(out / "panoptic")) == ["img_000.png", "img_001.png"]


def _evaluate_on_each_rank(files, out_dir):
    """One process of launch(): rank R evaluates image R of ``files`` (two images of one name)
    with PNGs kept in ``out_dir``; rank 0 writes the results to ``out_dir/results.json``."""
    name = "__efficientps_test_evaluation_two_ranks"
    register_panoptic_dataset(name, **files)
    inputs, outputs = ground_truth_as_predictions(name)
    rank = comm.get_rank()
    evaluator = PanopticEvaluator(name, out_dir, png_dir=os.path.join(out_dir, "panoptic"))
    evaluator.reset()
    evaluator.process(inputs[rank : rank + 1], outputs[rank : rank + 1])
    results = evaluator.evaluate()
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    # As in test_data_check: leave without the interpreter's teardown, in which torch (gloo,
    # CPU) aborts some spawned processes.
    comm.synchronize()
    os._exit(0)


def test_two_processes_gather_and_name_the_predictions_of_both(tmp_path):
    files = _one_name_in_two_folders(str(tmp_path))
    out = tmp_path / "out"
    # Two gloo processes, as train_net.py --num-gpus 2 on the CPU; "auto": a free port.
    launch(_evaluate_on_each_rank, 2, dist_url="auto", args=(files, str(out)))
    with open(out / "results.json") as f:
        assert json.load(f)["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    with open(out / "predictions.json") as f:
        names = [a["file_name"] for a in json.load(f)["annotations"]]
    assert sorted(names) == sorted(os.listdir(out / "panoptic")) == ["same_1.png", "same_2.png"]


def test_an_evaluation_that_fails_while_writing_keeps_the_previous_outputs(
    dataset, tmp_path, monkeypatch
):
    # Detectron2 opened predictions.json for writing, then serialised: a failure (or a kill)
    # there left it empty, next to the previous evaluation's PNGs.
    out = tmp_path / "out"
    cfg = load_config(opts=["TEST.KEEP_PANOPTIC_PNGS", True])

    def evaluate():
        evaluator = build_evaluator(cfg, dataset, str(out))._evaluators[0]
        evaluator.reset()
        evaluator.process(*ground_truth_as_predictions(dataset))
        return evaluator.evaluate()

    assert evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"predictions.json", "img_000.png", "img_001.png"} <= set(before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # What a kill (no clean-up) would have left is removed by the next evaluation.
    monkeypatch.undo()
    (out / ".predictions.0123456789ab.tmp.json").write_text('{"annotations": [')
    evaluate()
    assert not (out / ".predictions.0123456789ab.tmp.json").exists()


def test_instance_ap_of_exact_detections_with_per_category_rows(tmp_path, monkeypatch):
    """Box/mask AP on panoptic data whose metadata lists all classes (stuff too) as
    thing_classes: exact detections score 100, with one per-category row per thing class."""
    data_dir = ensure_synthetic_panoptic(str(tmp_path), num_train=1, num_val=3)
    files = synthetic._split_files(data_dir, "val")
    name = "__efficientps_test_instance_ap"
    register_panoptic_dataset(name, **files)
    meta = MetadataCatalog.get(name)
    assert len(meta.thing_classes) == 6  # the "standard" panoptic metadata: all classes
    evaluators = build_evaluator(load_config(), name, str(tmp_path / "eval"))._evaluators
    (evaluator,) = [e for e in evaluators if isinstance(e, ThingCOCOEvaluator)]

    with open(files["instances_json"]) as f:
        gt = json.load(f)
    evaluator.reset()
    for image in gt["images"]:
        annotations = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        instances = Instances((image["height"], image["width"]))
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        instances.pred_boxes = Boxes(torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1))
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor(
            [meta.thing_dataset_id_to_contiguous_id[a["category_id"]] for a in annotations]
        )
        instances.pred_masks = torch.stack(
            [torch.from_numpy(mask_util.decode(a["segmentation"])).bool() for a in annotations]
        )
        evaluator.process([{"image_id": image["id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    thing_names = {c["name"] for c in gt["categories"]}
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0)
        rows = {k[len("AP-") :] for k in results[task] if k.startswith("AP-")}
        assert rows == thing_names
    # Its files are replaced whole, as the semantic evaluator's (test above): an evaluation cut
    # short in its first file leaves the previous evaluation's files as they were.
    out = tmp_path / "eval"
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert {"coco_instances_results.json", "instances_predictions.pth"} <= set(before)

    def cut_short(obj, f, *args, **kwargs):  # instances_predictions.pth, written first
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        evaluator.evaluate()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before

    # No detection at all: every instance is missed, AP 0 (Detectron2 alone says nan).
    evaluator.reset()
    for image in gt["images"]:
        instances = Instances((image["height"], image["width"]))
        instances.pred_boxes = Boxes(torch.zeros((0, 4)))
        instances.scores = torch.zeros(0)
        instances.pred_classes = torch.zeros(0, dtype=torch.int64)
        instances.pred_masks = torch.zeros((0, image["height"], image["width"]), dtype=torch.bool)
        evaluator.process([{"image_id": image["id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == 0.0 and results[task]["AP50"] == 0.0
