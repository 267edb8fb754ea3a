"""The Cityscapes evaluators as build_evaluator wires them (COCOPanopticEvaluator, the official
Cityscapes semantic and instance scripts), end to end on the Cityscapes fixture: the ground truth
as predictions scores PQ, mIoU and AP 100; one car removed lowers each by what the fixture's
own arrays say it must."""

import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from detectron2.data import MetadataCatalog
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import rgb2id
from PIL import Image

from efficientps_d2.evaluation import build_evaluator
from tests.common import load_config
from tests.fixtures import write_cityscapes_panoptic

NUM_CLASSES = 19  # Cityscapes train ids


@pytest.fixture(scope="module")
def cityscapes():
    # Detectron2's Cityscapes code splits paths at the first "."; keep the root free of dots.
    root = tempfile.mkdtemp(prefix="cityscapes_e2e_", dir="/tmp")
    try:
        records = write_cityscapes_panoptic(root, splits=("val",))["val"]
        gt_root = os.path.join(root, "cityscapes", "gtFine")
        name = f"__cityscapes_e2e_{uuid.uuid4().hex[:8]}"
        builtin = MetadataCatalog.get("cityscapes_fine_panoptic_val").as_dict()
        builtin.pop("name")
        builtin.update(
            panoptic_root=os.path.join(gt_root, "cityscapes_panoptic_val"),
            panoptic_json=os.path.join(gt_root, "cityscapes_panoptic_val.json"),
            image_root=os.path.join(root, "cityscapes", "leftImg8bit", "val"),
            gt_dir=os.path.join(gt_root, "val"),
        )
        MetadataCatalog.get(name).set(**builtin)
        yield name, records
    finally:
        shutil.rmtree(root, ignore_errors=True)
        MetadataCatalog.remove(name)


def _label_ids(record):
    """The record's *_gtFine_labelIds.png (what the semantic script reads) and instanceIds."""
    gt = record["sem_seg_file_name"].replace("labelTrainIds", "{}")
    labels = np.asarray(Image.open(gt.format("labelIds"))).astype(np.int64)
    instances = np.asarray(Image.open(gt.format("instanceIds"))).astype(np.int64)
    return labels, instances


def _outputs(record, metadata, removed=None):
    """Model-style outputs equal to the ground truth, without segment ``removed`` (its pixels:
    void in the panoptic map, road in the semantic map, no instance)."""
    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]))).astype(np.int64)
    things = metadata.thing_dataset_id_to_contiguous_id
    stuff = metadata.stuff_dataset_id_to_contiguous_id
    labels, _ = _label_ids(record)
    train_ids = np.full(labels.shape, 0, dtype=np.int64)  # void pixels: any class, not scored
    for label_id in np.unique(labels):
        train_id = id2label[int(label_id)].trainId
        if 0 <= train_id < NUM_CLASSES:
            train_ids[labels == label_id] = train_id
    segments, masks, classes = [], [], []
    for s in record["segments_info"]:
        if s["id"] == removed:
            ids[ids == removed] = 0
            train_ids[rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]))) == removed] = 0
            continue
        isthing = s["category_id"] in things
        contiguous = (things if isthing else stuff)[s["category_id"]]
        segments.append({"id": s["id"], "category_id": contiguous, "isthing": isthing})
        if isthing and not s["iscrowd"]:
            masks.append(ids == s["id"])
            classes.append(contiguous)
    sem_seg = torch.nn.functional.one_hot(torch.from_numpy(train_ids), NUM_CLASSES)
    instances = Instances(ids.shape)
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    instances.pred_classes = torch.tensor(classes)
    instances.scores = torch.ones(len(classes))
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
    return {
        "panoptic_seg": (torch.from_numpy(ids.astype(np.int32)), segments),
        "sem_seg": sem_seg.permute(2, 0, 1).float(),
        "instances": instances,
    }


def _evaluate(name, records, output_dir, removed=None):
    evaluator = build_evaluator(load_config(), name, output_dir)
    evaluator.reset()
    metadata = MetadataCatalog.get(name)
    for r in records:
        inputs = [{"file_name": r["file_name"], "image_id": r["image_id"]}]
        evaluator.process(inputs, [_outputs(r, metadata, removed)])
    return evaluator.evaluate()


def test_ground_truth_scores_100_and_one_car_less_scores_what_the_fixture_says(
    cityscapes, tmp_path, monkeypatch
):
    name, records = cityscapes
    monkeypatch.chdir(tmp_path)  # the official instance script writes "matches.json" to the cwd
    numpy_had_in1d = "in1d" in vars(np)
    results = _evaluate(name, records, str(tmp_path / "gt"))
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)

    # Remove the car: the only instance of its class that instance AP counts (Cityscapes ignores
    # instances under 100 pixels and groups). Removing the big person instead would leave the
    # small one's detection matched only to an ignored instance, which the official script does
    # not survive (IndexError in evaluateMatches).
    (record,) = records
    labels, instance_ids = _label_ids(record)
    from cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling import args

    counted = {}  # class label id -> instance ids that instance AP counts
    for i in np.unique(instance_ids[instance_ids >= 1000]):
        if (instance_ids == i).sum() >= args.minRegionSizes[0]:
            counted.setdefault(int(i) // 1000, []).append(int(i))
    car, road = 26, 7  # Cityscapes label ids
    assert id2label[car].name == "car" and id2label[road].name == "road"
    assert len(counted[car]) == 1 and len(counted) == 2, counted
    removed = counted[car][0]
    n = int((instance_ids == removed).sum())

    # PQ: a class with m scored segments keeps TP = m - 1 and gets FN = 1 (SQ stays 1):
    # PQ = (m - 1) / (m - 1 + 1/2); every other class present is perfect.
    scored = [s["category_id"] for s in record["segments_info"] if not s["iscrowd"]]
    m = scored.count(car)
    expected_pq = 100 * (len(set(scored)) - 1 + (m - 1) / (m - 0.5)) / len(set(scored))
    # mIoU over the classes in the ground truth: the car's n pixels become road.
    evaluated = [int(i) for i in np.unique(labels) if not id2label[int(i)].ignoreInEval]
    cars, roads = int((labels == car).sum()), int((labels == road).sum())
    expected_iou = (
        100 * (len(evaluated) - 2 + (cars - n) / cars + roads / (roads + n)) / len(evaluated)
    )
    # AP over the classes with counted instances: the car class drops to 0.
    expected_ap = 100 * (len(counted) - 1) / len(counted)

    results = _evaluate(name, records, str(tmp_path / "removed"), removed=removed)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(expected_pq)
    assert results["sem_seg"]["IoU"] == pytest.approx(expected_iou)
    assert results["segm"]["AP"] == pytest.approx(expected_ap)
    # The fixture: sky, building, road, person, car; the car group is crowd; 2 persons count
    # for PQ, 1 for AP.
    assert (expected_pq, expected_ap, len(evaluated)) == (80.0, 50.0, 5)
    assert expected_iou < 100.0
    # The numpy 2 patches were undone and the instance script wrote nothing here.
    assert ("in1d" in vars(np)) == numpy_had_in1d
    assert not (tmp_path / "matches.json").exists()
