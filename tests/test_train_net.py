"""train_net.py end to end as a user runs it: train, checkpoint, evaluate, --eval-only, --resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import torch
from panopticapi.utils import rgb2id
from PIL import Image

from efficientps_d2.output_lock import lock_output_dir
from tests.common import killed_writers_temporary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "Synthetic-PanopticSegmentation", "efficientps_b0_quick.yaml")
R50_QUICK = os.path.join(
    REPO, "configs", "Synthetic-PanopticSegmentation", "efficientps_R_50_quick.yaml"
)
# The quick config's heads made narrower, so that a model is built and run in seconds.
NARROW_HEADS = [
    "MODEL.TWO_WAY_FPN.OUT_CHANNELS", "32",
    "MODEL.SEM_SEG_HEAD.DPC_CHANNELS", "16",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
]  # fmt: skip
# ... and a few tiny steps, so a run takes seconds.
TINY = [
    *NARROW_HEADS,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.01",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def train_net(args, data_root, stdout=subprocess.PIPE, config_file=QUICK):
    env = dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file, *args]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, text=True
    )


def run_to_end(args, data_root, timeout=900, config_file=QUICK):
    proc = train_net(args, data_root, config_file=config_file)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def copypaste_results(log):
    """Detectron2's 'copypaste' blocks (Task, metric names, values): {task: {metric: value}}."""
    lines = re.findall(r"copypaste: (.*)", log)
    results = {}
    for task, names, values in zip(lines[0::3], lines[1::3], lines[2::3]):
        results[task.replace("Task: ", "")] = dict(zip(names.split(","), values.split(",")))
    return results


def test_train_checkpoint_evaluate_then_eval_only_reproduces(tmp_path, data_root):
    out_dir = str(tmp_path / "run")
    log = run_to_end(
        [*TINY, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out_dir],
        data_root,
    )
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= set(
        os.listdir(out_dir)
    )
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))  # tensorboard
    assert "torch.jit.script` is deprecated" not in log  # fvcore's import-time warnings
    with open(os.path.join(out_dir, "log.txt")) as f:  # our loggers reach log.txt too
        assert (
            "efficientps_d2.data.check INFO: Checked data set 'synthetic_panoptic_train'"
            in f.read()
        )
    # The real evaluators ran: panoptic quality, semantic mIoU and box/mask AP.
    trained = copypaste_results(log)
    assert set(trained) == {"panoptic_seg", "sem_seg", "bbox", "segm"}
    assert {"PQ", "SQ", "RQ"} <= set(trained["panoptic_seg"]) and "mIoU" in trained["sem_seg"]
    assert re.search(r"PQ\s*\|\s*SQ\s*\|\s*RQ", log)

    log = run_to_end(
        [
            "--eval-only",
            *TINY,
            "MODEL.WEIGHTS",
            os.path.join(out_dir, "model_final.pth"),
            "OUTPUT_DIR",
            str(tmp_path / "eval"),
        ],
        data_root,
    )
    assert copypaste_results(log) == trained


def test_sigkill_then_resume_continues_to_final_iteration(tmp_path, data_root):
    out_dir = tmp_path / "run"
    args = [*TINY, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "DATASETS.TEST", "()"]
    args += ["OUTPUT_DIR", str(out_dir)]
    log_path = tmp_path / "killed_run.log"
    # The log goes to a file: a pipe nobody reads while we wait would fill up and stall the run.
    with open(log_path, "w") as log_file:
        proc = train_net(args, data_root, stdout=log_file)
        deadline = time.time() + 900  # a bound on a hang; the run itself takes seconds
        # Kill once a checkpoint is tagged: the checkpoint file is renamed into place before
        # last_checkpoint is, so waiting for the file alone races with the tag.
        while not (out_dir / "last_checkpoint").exists():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out_dir / "model_final.pth").exists()
    # A kill never leaves a half-written checkpoint: what last_checkpoint names is complete.
    last = (out_dir / "last_checkpoint").read_text()
    assert (out_dir / last).exists()
    resumed_from = int(re.search(r"model_(\d+)\.pth", last).group(1))

    log = run_to_end(["--resume", *args], data_root)
    assert f"Starting training from iteration {resumed_from + 1}" in log
    assert (out_dir / "model_final.pth").exists()
    with open(out_dir / "metrics.json") as f:
        iterations = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert iterations[-1] == 11


def test_resume_logs_each_iteration_once_and_eval_only_keeps_the_training_config(
    tmp_path, data_root
):
    # Detectron2's JSONWriter appended the resumed run's records after those the killed run had
    # logged after its last checkpoint (the same iterations twice: plots zigzagged), tensorboard
    # showed them twice, and an --eval-only run into the folder replaced its config.yaml.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "run"
    args = [*TINY, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "DATASETS.TEST", "()"]
    args += ["OUTPUT_DIR", str(out_dir)]
    run_to_end(args, data_root)  # logs iteration 11 (DefaultTrainer writes every 20 and last)
    # The folder that a run killed after logging iteration 11, its last checkpoint that of
    # iteration 3, leaves: the later checkpoints go.
    for name in ("model_0000007.pth", "model_final.pth"):
        os.remove(out_dir / name)
    (out_dir / "last_checkpoint").write_text("model_0000003.pth")
    log = run_to_end(["--resume", *args], data_root)
    assert "Starting training from iteration 4" in log
    with open(out_dir / "metrics.json") as f:
        assert [json.loads(line)["iteration"] for line in f] == [11]
    events = EventAccumulator(str(out_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("total_loss")] == [11]

    training_config = (out_dir / "config.yaml").read_text()
    evaluate = ["--eval-only", "--resume", *args, "DATASETS.TEST", "('synthetic_panoptic_val',)"]
    assert "panoptic_seg" in copypaste_results(run_to_end(evaluate, data_root))
    assert (out_dir / "config.yaml").read_text() == training_config
    assert "synthetic_panoptic_val" in (out_dir / "config_eval.yaml").read_text()


def test_no_evaluation_after_the_last_checkpoint_fails(tmp_path, data_root):
    # Detectron2's EvalHook evaluated the unsaved weights after an error in the last iteration
    # (here saving model_final.pth, which a folder blocks), before the error was shown.
    out_dir = tmp_path / "run"
    (out_dir / "model_final.pth").mkdir(parents=True)
    proc = train_net([*TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out_dir)], data_root)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0 and "IsADirectoryError" in log, log[-4000:]
    assert "Start inference" not in log and not (out_dir / "inference").exists()


def data_with_grayscale_png(tmp_path, data_root):
    """(root, png): a copy of the data whose first validation PNG is 8-bit grayscale."""
    root = tmp_path / "datasets"
    shutil.copytree(os.path.join(data_root, "synthetic_panoptic"), root / "synthetic_panoptic")
    png = sorted((root / "synthetic_panoptic" / "panoptic_val").glob("*.png"))[0]
    Image.open(png).convert("L").save(png)
    return root, png


def test_bad_panoptic_png_refused_before_training(tmp_path, data_root):
    # panopticapi would crash on a grayscale PNG after training; the start-up check names it
    # before the first iteration.
    root, png = data_with_grayscale_png(tmp_path, data_root)
    out_dir = tmp_path / "run"
    proc = train_net([*TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out_dir)], str(root))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert f"Panoptic PNG '{png}' has mode L" in out
    assert "Starting training" not in out
    assert not list(out_dir.glob("*.pth"))


def test_partial_weights_refused_before_training(tmp_path, data_root):
    # Backbone weights without the converter's marker would leave the heads random: training
    # refuses them (MODEL.ALLOW_PARTIAL_WEIGHTS opts in), as evaluation refuses misfits.
    from detectron2.modeling import build_model

    from tests.common import load_config

    cfg = load_config("Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml", TINY)
    state = build_model(cfg).state_dict()
    weights = str(tmp_path / "backbone.pth")
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, weights)
    # A checkpoint write killed by an earlier run left its temporary file: removed, never read.
    stale = killed_writers_temporary(str(tmp_path / "run" / "model_0000001.pth"))
    open(stale, "wb").close()
    # ... and its checkpoints, which a run without --resume overwrites: it says so.
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000001.pth")
    args = [*TINY, "SOLVER.MAX_ITER", "2", "MODEL.WEIGHTS", weights]
    proc = train_net([*args, "OUTPUT_DIR", str(tmp_path / "run")], data_root)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert f"Checkpoint '{weights}' lacks" in out and "MODEL.ALLOW_PARTIAL_WEIGHTS" in out
    assert "Starting training" not in out
    assert not os.path.exists(stale)
    assert (
        "holds the checkpoints of an earlier run (last_checkpoint names 'model_0000001.pth')"
        in (" ".join(out.split()))  # the log's line breaks
    )


def test_second_run_on_the_same_output_dir_is_refused(tmp_path, data_root):
    out_dir = tmp_path / "run"
    held = lock_output_dir(str(out_dir))  # as a run in progress holds it
    try:
        proc = train_net([*TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out_dir)], data_root)
        out, _ = proc.communicate(timeout=600)
    finally:
        held.close()
    assert proc.returncode != 0
    assert f"is in use by another training run (PID {os.getpid()}" in out
    assert sorted(os.listdir(out_dir)) == [".train_net.lock"]  # nothing written


def test_resnet_50_trains_evaluates_and_runs_in_the_demo(tmp_path, data_root):
    out_dir = tmp_path / "r50"
    narrow = [  # ResNet-50's depth at 1/8 of its width, for a test in seconds
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
        "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    ]  # fmt: skip
    log = run_to_end(
        [*TINY, *narrow, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out_dir)],
        data_root,
        config_file=R50_QUICK,
    )
    assert "ResNet" in log  # the model printed at start: ResNet under the 2-way FPN
    results = copypaste_results(log)
    assert set(results) == {"panoptic_seg", "sem_seg", "bbox", "segm"}
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"])

    # The demo on the trained model, from the config train_net saved next to it.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    cv2.imwrite(str(images / "a.png"), rng.randint(0, 255, (64, 96, 3), np.uint8))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "demo.py"), "--config-file"]
        + [str(out_dir / "config.yaml"), "--input", str(images), "--output", str(out)]
        + ["--save-panoptic", "--confidence-threshold", "0"]
        + ["--opts", "MODEL.WEIGHTS", str(out_dir / "model_final.pth"), "MODEL.DEVICE", "cpu"],
        env=dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.jit.script` is deprecated" not in proc.stderr
    assert sorted(os.listdir(out)) == ["a.png", "panoptic", "predictions.json"]
    (annotation,) = json.loads((out / "predictions.json").read_text())["annotations"]
    ids = rgb2id(np.asarray(Image.open(out / "panoptic" / annotation["file_name"])))
    assert ids.shape == (64, 96)
    assert set(np.unique(ids)) - {0} == {s["id"] for s in annotation["segments_info"]}


def test_readmes_own_default_trainer_trains_and_evaluates(tmp_path, data_root):
    """The README's DefaultTrainer subclass (Detectron2's tutorial way): without EfficientPS's
    optimizer builder, Detectron2's stopped at "'full_model' is not a valid GradientClipType"."""
    from efficientps_d2 import setup_cfg
    from efficientps_d2.data.synthetic import register_synthetic

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    code = re.search(r"\*\*A trainer of your own\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(code, namespace)
    train, val = register_synthetic(data_root, prefix="readme_trainer_synthetic")
    opts = [*TINY, "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0", "MODEL.DEVICE", "cpu"]
    opts += ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]
    cfg = setup_cfg(QUICK, [*opts, "OUTPUT_DIR", str(tmp_path)])
    trainer = namespace["MyTrainer"](cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert os.path.isfile(tmp_path / "model_final.pth")
    results = namespace["MyTrainer"].test(cfg, trainer.model)
    assert {"panoptic_seg", "sem_seg", "bbox", "segm"} <= set(results)
