"""train_net.py --num-gpus 2 on the CPU: two gloo processes train, checkpoint, resume and evaluate,
and their distributed evaluation scores the weights as one process does."""

import os

from tests.test_train_net import TINY, copypaste_results, run_to_end

# SyncBN in the trunk: on the CPU it becomes Detectron2's NaiveSyncBatchNorm (all_reduce).
# STUFF_AREA_LIMIT 0 lets the few-step model's stuff segments count, so PQ is not trivially 0.
OPTS = [*TINY, "MODEL.EFFICIENTNET.NORM", "SyncBN", "MODEL.PANOPTIC_FUSION.STUFF_AREA_LIMIT", "0"]


def test_two_cpu_processes_train_resume_evaluate_like_one(tmp_path, data_root):
    out_dir = str(tmp_path / "run")
    two = ["--num-gpus", "2", "--dist-url", "auto"]  # a free port: tests may run side by side
    args = [*OPTS, "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", out_dir]
    log = run_to_end([*two, *args, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"], data_root)
    assert "World size: 2" in log and "use naiveSyncBN instead of SyncBN" in log
    assert {"model_0000000.pth", "model_final.pth"} <= set(os.listdir(out_dir))

    log = run_to_end([*two, "--resume", *args, "SOLVER.MAX_ITER", "3"], data_root)
    assert "Starting training from iteration 2" in log
    distributed = copypaste_results(log)
    assert {"panoptic_seg", "sem_seg"} <= set(distributed)

    weights = os.path.join(out_dir, "model_final.pth")
    log = run_to_end(
        ["--eval-only", *OPTS, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "eval")],
        data_root,
    )
    single = copypaste_results(log)
    for task in ("panoptic_seg", "sem_seg"):
        assert single[task] == distributed[task], task
