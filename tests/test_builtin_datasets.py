"""Detectron2's built-in panoptic registrations load the fixtures of tests/fixtures.py.

Detectron2 registers its built-in data sets when ``detectron2.data`` is first imported, under the
root in ``DETECTRON2_DATASETS`` at that moment. To exercise that real code path (root lookup,
registration, loaders, metadata), the data sets are loaded in a fresh Python process with
``DETECTRON2_DATASETS`` pointing at the fixtures; the results come back as json.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import write_cityscapes_panoptic, write_coco_panoptic

NAMES = [
    "cityscapes_fine_panoptic_train",
    "cityscapes_fine_panoptic_val",
    "coco_2017_train_panoptic",
    "coco_2017_val_panoptic",
]

# Dataset category id -> Detectron2's contiguous id, for the categories the fixtures use.
# Cityscapes: the trainId; COCO "standard": the index among the 133 panoptic categories.
CITYSCAPES_CONTIGUOUS = {7: 0, 11: 2, 23: 10, 24: 11, 26: 13}
COCO_CONTIGUOUS = {1: 0, 3: 2, 18: 16, 149: 100, 184: 116, 187: 119}
CITYSCAPES_THINGS, COCO_THINGS = {24, 26}, {1, 3, 18}

_LOADER = r"""
import json, sys
from detectron2.data import DatasetCatalog, MetadataCatalog
from efficientps_d2.data.check import check_dataset

out = {}
for name in sys.argv[2:]:
    meta = MetadataCatalog.get(name)
    out[name] = {
        "dicts": DatasetCatalog.get(name),
        "meta": {
            key: getattr(meta, key)
            for key in ("panoptic_root", "panoptic_json", "image_root", "evaluator_type",
                        "label_divisor", "ignore_label")
        },
        "things": {str(k): v for k, v in meta.thing_dataset_id_to_contiguous_id.items()},
        "stuff": {str(k): v for k, v in meta.stuff_dataset_id_to_contiguous_id.items()},
        "check_errors": check_dataset(name).errors,
    }
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2_datasets"))
    cleanup = None
    if "." in root:
        # Detectron2's Cityscapes loader derives the labelTrainIds path with `.split(".")[0]` on
        # the whole path: a dot anywhere in the root breaks it. Use a dot-free folder instead.
        root = cleanup = tempfile.mkdtemp(prefix="d2_datasets_", dir="/tmp")
    try:
        expected = {
            "cityscapes": write_cityscapes_panoptic(root),
            "coco": write_coco_panoptic(root),
        }
        out_file = os.path.join(root, "loaded.json")
        env = dict(os.environ, DETECTRON2_DATASETS=root)
        proc = subprocess.run(
            [sys.executable, "-c", _LOADER, out_file, *NAMES],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(out_file) as f:
            yield root, expected, json.load(f)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _expected_segments(segments, contiguous, things, with_isthing):
    out = []
    for s in segments:
        s = dict(s, category_id=contiguous[s["category_id"]])
        if with_isthing:
            s["isthing"] = s["category_id"] in {contiguous[t] for t in things}
        out.append(s)
    return out


def _check_png(record):
    rgb = np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    present = {int(i): int(n) for i, n in zip(*np.unique(ids, return_counts=True)) if i != 0}
    assert present == {s["id"]: s["area"] for s in record["segments_info"]}


@pytest.mark.parametrize("split", ["train", "val"])
def test_cityscapes_fine_panoptic(loaded, split):
    root, expected, out = loaded
    result = out[f"cityscapes_fine_panoptic_{split}"]
    assert result["meta"]["panoptic_root"] == os.path.join(
        root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}"
    )
    assert result["meta"]["evaluator_type"] == "cityscapes_panoptic_seg"
    assert result["meta"]["label_divisor"] == 1000
    dicts = sorted(result["dicts"], key=lambda d: d["image_id"])
    want = expected["cityscapes"][split]
    assert [d["image_id"] for d in dicts] == [w["image_id"] for w in want]
    for d, w in zip(dicts, want):
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            assert d[key] == w[key]
            assert os.path.isfile(d[key])
        # Detectron2's Cityscapes loader does not add "isthing" (the COCO one does).
        assert d["segments_info"] == _expected_segments(
            w["segments_info"], CITYSCAPES_CONTIGUOUS, CITYSCAPES_THINGS, with_isthing=False
        )
        _check_png(d)
        crowd = [s for s in d["segments_info"] if s["iscrowd"]]
        assert [(s["id"], s["category_id"]) for s in crowd] == [(26, 13)]
    # Thing contiguous ids live in the all-class (trainId) space, not 0..#things-1.
    assert result["things"] == {str(k): CITYSCAPES_CONTIGUOUS[k] for k in (24, 26)} | {
        "25": 12,
        "27": 14,
        "28": 15,
        "31": 16,
        "32": 17,
        "33": 18,
    }
    assert len(result["stuff"]) == 11 and result["stuff"]["23"] == 10


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_2017_panoptic(loaded, split):
    root, expected, out = loaded
    result = out[f"coco_2017_{split}_panoptic"]
    assert result["meta"]["panoptic_json"] == os.path.join(
        root, "coco", "annotations", f"panoptic_{split}2017.json"
    )
    assert result["meta"]["image_root"] == os.path.join(root, "coco", f"{split}2017")
    assert result["meta"]["evaluator_type"] == "coco_panoptic_seg"
    dicts = result["dicts"]
    want = expected["coco"][split]
    assert [d["image_id"] for d in dicts] == [w["image_id"] for w in want]
    for d, w in zip(dicts, want):
        assert d["file_name"] == w["file_name"] and os.path.isfile(d["file_name"])
        assert d["pan_seg_file_name"] == w["pan_seg_file_name"]
        assert d["segments_info"] == _expected_segments(
            w["segments_info"], COCO_CONTIGUOUS, COCO_THINGS, with_isthing=True
        )
        _check_png(d)
        assert sum(s["iscrowd"] for s in d["segments_info"]) == 1
    assert len(result["things"]) == 80 and len(result["stuff"]) == 53
    for dataset_id, contiguous_id in COCO_CONTIGUOUS.items():
        kind = "things" if dataset_id in COCO_THINGS else "stuff"
        assert result[kind][str(dataset_id)] == contiguous_id


def test_fixtures_pass_the_data_check(loaded):
    # efficientps_d2.data.check (run before training) accepts valid Cityscapes and COCO data.
    _, _, data = loaded
    for name in NAMES:
        assert data[name]["check_errors"] == [], name


def test_cityscapes_dicts_map_to_training_targets(loaded):
    # Detectron2's Cityscapes dicts have no "isthing": the training mapper takes it from the
    # classes (it used to stop at the first image, "a segment has no 'isthing'").
    from efficientps_d2.data.dataset_mapper import EfficientPSDatasetMapper

    _, _, out = loaded
    things = sorted(out["cityscapes_fine_panoptic_train"]["things"].values())
    mapper = EfficientPSDatasetMapper(
        True, augmentations=[], image_format="RGB", thing_semantic_ids=things, num_classes=19
    )
    for d in out["cityscapes_fine_panoptic_train"]["dicts"]:
        mapped = mapper(d)
        # Two persons and a car (the car group is a crowd: no instance), as Mask R-CNN classes.
        assert mapped["instances"].gt_classes.tolist() == [things.index(11)] * 2 + [
            things.index(13)
        ]
        labels = set(np.unique(mapped["sem_seg"].numpy()).tolist())
        assert labels == {0, 2, 10, 11, 13, 255}  # road, building, sky, person, car, void
