import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator

from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.evaluation import (
    PanopticSemSegEvaluator,
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


def test_build_evaluator_follows_the_evaluator_type(dataset, tmp_path):
    cfg = load_config()
    evaluators = build_evaluator(cfg, dataset, str(tmp_path))._evaluators
    assert [type(e) for e in evaluators] == [COCOPanopticEvaluator, PanopticSemSegEvaluator]
    MetadataCatalog.get("__efficientps_test_not_panoptic").set(evaluator_type="sem_seg")
    with pytest.raises(NotImplementedError, match="__efficientps_test_not_panoptic.*sem_seg"):
        build_evaluator(cfg, "__efficientps_test_not_panoptic")
