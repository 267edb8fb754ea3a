"""Pictures while training (VIS_PERIOD) in tensorboard, and the evaluation's panoptic PNGs kept
under OUTPUT_DIR (TEST.KEEP_PANOPTIC_PNGS), from a short train_net.py run."""

import io
import json
import os

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from efficientps_d2.data.synthetic import ensure_synthetic_panoptic
from efficientps_d2.visualization import IMAGE_NAME
from tests.test_train_net import TINY, copypaste_results, run_to_end

VAL = "synthetic_panoptic_val"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    ensure_synthetic_panoptic(str(root), num_train=2, num_val=3)
    return str(root)


def test_tensorboard_gets_panoptic_pictures_and_the_evaluation_keeps_its_pngs(tmp_path, data_root):
    out_dir = str(tmp_path / "run")
    log = run_to_end(
        [*TINY, "SOLVER.MAX_ITER", "2", "VIS_PERIOD", "1", "TEST.KEEP_PANOPTIC_PNGS", "True"]
        + ["OUTPUT_DIR", out_dir],
        data_root,
    )

    # One picture per iteration: ground truth and prediction side by side, each as large as the
    # training image (the synthetic data: 128x192).
    events = EventAccumulator(out_dir, size_guidance={"images": 0})
    events.Reload()
    assert IMAGE_NAME in events.Tags()["images"], events.Tags()
    pictures = events.Images(IMAGE_NAME)
    assert [p.step for p in pictures] == [0, 1]
    first = np.asarray(Image.open(io.BytesIO(pictures[0].encoded_image_string)).convert("RGB"))
    assert first.shape == (128, 2 * 192, 3)
    left, right = first[:, :192], first[:, 192:]
    assert not np.array_equal(left, right)  # ground truth vs a barely trained model

    # The PNGs the evaluation scored, kept next to its predictions.json: together they score the
    # PQ the run reported.
    folder = os.path.join(out_dir, "inference", VAL)
    with open(os.path.join(folder, "predictions.json")) as f:
        predictions = json.load(f)
    pngs = sorted(os.listdir(os.path.join(folder, "panoptic")))
    assert pngs == sorted(a["file_name"] for a in predictions["annotations"]) and len(pngs) == 3
    for ann in predictions["annotations"]:
        ids = rgb2id(np.asarray(Image.open(os.path.join(folder, "panoptic", ann["file_name"]))))
        assert set(np.unique(ids)) - {0} <= {s["id"] for s in ann["segments_info"]}
    gt = os.path.join(data_root, "synthetic_panoptic")
    result = pq_compute(
        os.path.join(gt, "panoptic_val.json"),
        os.path.join(folder, "predictions.json"),
        gt_folder=os.path.join(gt, "panoptic_val"),
        pred_folder=os.path.join(folder, "panoptic"),
    )
    reported = float(copypaste_results(log)["panoptic_seg"]["PQ"])
    assert 100 * result["All"]["pq"] == pytest.approx(reported, abs=1e-3)
