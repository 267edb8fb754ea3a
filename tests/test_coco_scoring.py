"""demo.py --save-panoptic output scored by panopticapi's pq_compute against a COCO ground truth:
image ids from numeric COCO file names, from --image-info and from a registered data set."""

import hashlib
import json
import os
import shutil
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image

import demo
from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.data.metadata import panoptic_metadata
from efficientps_d2.demo import CocoPanopticWriter, EfficientPSPredictor, ImageIds
from tests.common import PERMISSIVE, save_random_model, tiny_config
from tests.fixtures import write_coco_panoptic


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The COCO fixture's train split (two images, numeric COCO file names), its metadata under
    a name with no files (ids must come from the file names) and a model config for it."""
    root = tmp_path_factory.mktemp("coco_scoring")
    records = write_coco_panoptic(str(root), splits=("train",), instances=False)["train"]
    base = root / "coco"
    gt_json = base / "annotations" / "panoptic_train2017.json"
    categories = json.loads(gt_json.read_text())["categories"]
    name = f"__coco_scoring_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(**panoptic_metadata(categories))
    metadata = MetadataCatalog.get(name)
    cfg = tiny_config(PERMISSIVE + ["TEST.DETECTIONS_PER_IMAGE", 10])
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(categories)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(metadata.thing_dataset_id_to_contiguous_id)
    cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = []
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), (name,)
    config_file = save_random_model(cfg, root, "random")
    return {
        "root": root,
        "records": records,
        "images": base / "train2017",
        "gt_json": str(gt_json),
        "gt_folder": str(base / "panoptic_train2017"),
        "metadata": metadata,
        "config_file": str(config_file),
    }


def _ground_truth_predictor(monkeypatch, coco):
    """Replaces the model's output by the fixture's ground truth (found by the image's pixels)."""
    metadata = coco["metadata"]
    by_pixels = {}
    for r in coco["records"]:
        image = read_image(r["file_name"], format="BGR")
        ids = rgb2id(np.asarray(Image.open(r["pan_seg_file_name"])))
        segments = []
        for s in r["segments_info"]:
            isthing = s["category_id"] in metadata.thing_dataset_id_to_contiguous_id
            table = (
                metadata.thing_dataset_id_to_contiguous_id
                if isthing
                else (metadata.stuff_dataset_id_to_contiguous_id)
            )
            segments.append(
                {"id": s["id"], "category_id": table[s["category_id"]], "isthing": isthing}
            )
        by_pixels[hashlib.sha1(image.tobytes()).hexdigest()] = (torch.from_numpy(ids), segments)

    def predict(self, image):
        return {"panoptic_seg": by_pixels[hashlib.sha1(image.tobytes()).hexdigest()]}

    monkeypatch.setattr(EfficientPSPredictor, "__call__", predict)


def _score(coco, out):
    return pq_compute(
        coco["gt_json"],
        str(out / "predictions.json"),
        gt_folder=coco["gt_folder"],
        pred_folder=str(out / "panoptic"),
    )


def test_ground_truth_as_predictions_scores_pq_100(tmp_path, coco, monkeypatch, capsys):
    _ground_truth_predictor(monkeypatch, coco)
    out = tmp_path / "out"
    args = ["--config-file", coco["config_file"], "--output", str(out), "--save-panoptic"]
    assert demo.main(args + ["--input", str(coco["images"])]) == 0, capsys.readouterr().err
    predictions = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == [9, 25]  # "000000000009.jpg"
    assert "file name as image id" not in capsys.readouterr().out
    result = _score(coco, out)
    for kind in ("All", "Things", "Stuff"):
        assert result[kind]["pq"] == pytest.approx(1.0), (kind, result)

    # Files named otherwise: --image-info (a COCO "images" list) gives their ids.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    info = []
    for letter, r in zip("ab", coco["records"]):
        shutil.copy(r["file_name"], renamed / f"{letter}.jpg")
        info.append({"id": r["image_id"], "file_name": f"{letter}.jpg"})
    (tmp_path / "info.json").write_text(json.dumps(info))
    out2 = tmp_path / "out2"
    args = ["--config-file", coco["config_file"], "--output", str(out2), "--save-panoptic"]
    args += ["--input", str(renamed), "--image-info", str(tmp_path / "info.json")]
    assert demo.main(args) == 0, capsys.readouterr().err
    assert _score(coco, out2)["All"]["pq"] == pytest.approx(1.0)

    # Without it, the ids are the stems, and the run says why they will not score.
    out3 = tmp_path / "out3"
    args = ["--config-file", coco["config_file"], "--output", str(out3), "--save-panoptic"]
    assert demo.main(args + ["--input", str(renamed)]) == 0
    assert "2 images have their file name as image id" in capsys.readouterr().out
    with pytest.raises(Exception, match="no prediction for the image with id: 9"):
        _score(coco, out3)


def test_real_model_output_is_scored_for_a_registered_data_set(tmp_path, coco, capsys):
    """A tiny random model on a registered data set: ids come from its panoptic_json, and
    pq_compute runs through (the score of random weights is whatever it is)."""
    name = f"__coco_scoring_registered_{uuid.uuid4().hex[:8]}"
    register_panoptic_dataset(
        name,
        image_root=str(coco["images"]),
        panoptic_root=coco["gt_folder"],
        panoptic_json=coco["gt_json"],
    )
    out = tmp_path / "out"
    args = ["--config-file", coco["config_file"], "--output", str(out), "--save-panoptic"]
    args += ["--input", str(coco["images"]), "--opts", "DATASETS.TEST", f"('{name}',)"]
    assert demo.main(args) == 0, capsys.readouterr().err
    predictions = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == [9, 25]
    result = _score(coco, out)
    assert 0.0 <= result["All"]["pq"] <= 1.0 and result["All"]["n"] > 0


def test_image_ids_match_by_path_suffix_and_refuse_duplicates(tmp_path, coco):
    ids = ImageIds(
        [
            {"id": 7, "file_name": "frankfurt/a.png"},
            {"id": 8, "file_name": "munster/a.png"},
            {"id": 9, "file_name": "b.png"},
        ]
    )
    assert ids.lookup("/data/frankfurt/a.png") == 7
    assert ids.lookup("x/munster/a.png") == 8
    assert ids.lookup("/elsewhere/b.png") == 9
    assert ids.lookup("/x/000000142238.jpg") == 142238
    assert ids.lookup("/x/lindau/a.png") == "a" and ids.unmatched == [
        os.path.abspath("/x/lindau/a.png")
    ]
    with pytest.raises(ValueError, match=r"images\[0\].*'id'"):
        ImageIds([{"file_name": "a.png"}], source="info.json")
    (tmp_path / "bad.json").write_text('{"images": 3}')
    with pytest.raises(ValueError, match="bad.json"):
        ImageIds.from_json(str(tmp_path / "bad.json"))
    # Two inputs resolving to one id would make pq_compute score one of them twice.
    writer = CocoPanopticWriter(str(tmp_path / "p.json"), str(tmp_path / "png"), coco["metadata"])
    seg = np.zeros((4, 4), np.int32)
    writer.add(9, "x/000000000009.jpg", seg, [], 4, 4, png_name="a.png")
    with pytest.raises(ValueError, match="image id 9"):
        writer.add(9, "y/000000000009.jpg", seg, [], 4, 4, png_name="b.png")
