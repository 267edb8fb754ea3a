"""train_net.py's start-up steps (efficientps_d2.engine.startup, efficientps_d2.data.check), shared
by YAML and LazyConfig runs: the same checks, each naming its own config's keys."""

import contextlib
import functools
import glob
import itertools
import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from omegaconf import OmegaConf

from efficientps_d2.checkpoint import CheckpointMismatchError
from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.data.check import DataCheckError, validate_datasets
from efficientps_d2.engine import load_config, startup
from efficientps_d2.visualization import add_panoptic_visualization

from .common import killed_writers_temporary
from .test_lazy_config import CONFIGS, QUICK_PY, TINY, YAML_CONFIGS
from .test_train_net import data_with_grayscale_png, train_net

QUICK_YAML = QUICK_PY[: -len(".py")] + ".yaml"


def _quick_args(kind, *argv):
    """train_net.py's parsed command line for the quick config of ``kind`` (".py", ".yaml")."""
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args(
        ["--config-file", QUICK_PY[: -len(".py")] + kind, *argv]
    )


@pytest.mark.parametrize("name", YAML_CONFIGS)
def test_yaml_and_lazy_twins_give_the_same_start_up_settings(name):
    # The COCO twin read all 123k panoptic PNGs at start-up (~20 min) where the YAML reads the json.
    yaml_cfg = load_config(os.path.join(CONFIGS, name + ".yaml"))
    py_cfg = load_config(os.path.join(CONFIGS, name + ".py"))
    a, b = ConfigAdapter(yaml_cfg), ConfigAdapter(py_cfg)
    assert (a.device, a.weights, a.allow_partial_weights, a.amp_enabled, a.amp_precision) == (
        b.device,
        b.weights,
        b.allow_partial_weights,
        b.amp_enabled,
        b.amp_precision,
    )
    assert b.keys["allow_partial_weights"] == "train.allow_partial_weights"
    for field in (
        "train_dataset_names",
        "test_dataset_names",
        "num_classes",
        "num_things",
        "check_pngs",
        "thing_semantic_ids",
        "vis_period",
        "expected_results",
        "tta_enabled",
    ):
        assert getattr(a, field) == getattr(b, field), field
    assert (
        yaml_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        yaml_cfg.MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH,
    ) == (py_cfg.model.roi_heads.box_predictor.test_score_thresh, py_cfg.model.confidence_thresh)
    assert yaml_cfg.DATALOADER.MAX_UNREADABLE_FRACTION == (
        py_cfg.dataloader.train.max_unreadable_fraction
    )
    assert (yaml_cfg.SOLVER.CHECKPOINT_PERIOD, yaml_cfg.TEST.EVAL_PERIOD) == (
        py_cfg.train.checkpointer.period,
        py_cfg.train.eval_period,
    )
    assert (yaml_cfg.SOLVER.WARMUP_ITERS, yaml_cfg.SOLVER.WARMUP_FACTOR) == (
        py_cfg.lr_multiplier.warmup_iters,
        py_cfg.lr_multiplier.warmup_factor,
    )
    assert yaml_cfg.SEED == py_cfg.train.get("seed", -1)


@pytest.mark.parametrize(
    "key, value",
    [("model.sem_seg_head.num_classes", 5), ("model.roi_heads.num_classes", 2)],
)
def test_lazy_class_count_mismatch_names_the_lazy_key(key, value):
    cfg = load_config(QUICK_PY, [f"{key}={value}"])
    with pytest.raises(DataCheckError, match=f"{key} is {value} but data set 'synthetic_panoptic"):
        validate_datasets(cfg)


def test_lazy_unknown_dataset_name_names_the_lazy_key():
    cfg = load_config(QUICK_PY, ["dataloader.test.dataset.names=synthetic_panoptc_val"])
    with pytest.raises(DataCheckError, match="dataloader.test.dataset.names names data set") as e:
        validate_datasets(cfg, training=False)
    assert "synthetic_panoptic_val" in str(e.value)  # the closest registered name


def test_cpu_runs_use_naive_sync_bn_for_every_syncbn_norm_of_both_kinds():
    name = os.path.join(CONFIGS, "Cityscapes-PanopticSegmentation", "efficientps_b5")
    yaml_cfg = load_config(name + ".yaml", ["MODEL.DEVICE", "cpu"])
    py_cfg = load_config(name + ".py", ["train.device=cpu"])
    assert len(startup.use_naive_sync_bn(yaml_cfg)) == 4
    changed = startup.use_naive_sync_bn(py_cfg)
    assert "model.proposal_generator.head.norm" in changed and len(changed) == 4
    # The mask head's count-weighted naiveSyncBN_N already runs on the CPU.
    assert yaml_cfg.MODEL.ROI_MASK_HEAD.NORM == "naiveSyncBN_N"
    assert py_cfg.model.roi_heads.mask_head.conv_norm == "naiveSyncBN_N"
    assert "SyncBN" not in OmegaConf.to_yaml(py_cfg.model).replace("naiveSyncBN", "")
    # On CUDA nothing changes.
    on_cuda = load_config(name + ".py")
    on_cuda.train.device = "cuda"  # load_config chose "cpu" on a machine without CUDA
    assert startup.use_naive_sync_bn(on_cuda) == []


def test_cpu_yaml_run_uses_naive_sync_bn_for_the_resnet_norm():
    name = os.path.join(CONFIGS, "Cityscapes-PanopticSegmentation", "efficientps_R_50.yaml")
    cfg = load_config(name, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "SyncBN"])
    assert "MODEL.RESNETS.NORM" in startup.use_naive_sync_bn(cfg)
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"


def test_cpu_ddp_gets_no_device_ids(monkeypatch):
    calls = []
    monkeypatch.setattr(startup, "create_ddp_model", lambda model, **kw: calls.append(kw) or model)
    startup.wrap_ddp(torch.nn.Linear(1, 1), "cpu", broadcast_buffers=False)
    startup.wrap_ddp(torch.nn.Linear(1, 1), "cuda:0")
    assert calls == [
        {"device_ids": None, "broadcast_buffers": False},
        {"device_ids": [0]},  # the local rank of a single process
    ]


def test_lazy_amp_precision_is_checked_and_named():
    settings = ConfigAdapter(load_config(QUICK_PY, ["train.amp.precision=float64"]))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="train.amp.precision must be one of"):
        startup.build_trainer(model, [], optimizer, settings)


def test_bfloat16_amp_with_inplace_abn_warns_of_imprecise_norm_weight_gradients(caplog):
    from efficientps_d2.modeling.inplace_abn import InPlaceABN

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), InPlaceABN(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for precision, warned in (("bfloat16", True), ("float16", False)):
        opts = ["train.amp.enabled=True", f"train.amp.precision={precision}"]
        caplog.clear()
        startup.build_trainer(model, [], optimizer, ConfigAdapter(load_config(QUICK_PY, opts)))
        assert ("imprecise weight gradient" in caplog.text) == warned, precision


def test_amp_training_resumes_from_a_checkpoint_of_another_amp_setting():
    """Turning float16 AMP on (or moving from bfloat16 to float16) between runs: the checkpoint's
    trainer state has no gradient scaler state, or an empty one; Detectron2's AMPTrainer raised."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = ConfigAdapter(load_config(QUICK_PY, ["train.amp.enabled=True"]))
    trainer = startup.build_trainer(model, [], optimizer, settings)
    # An enabled scaler, as on CUDA (CUDA's disables itself on a machine without a GPU).
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    saved = {"iteration": 7, "optimizer": optimizer.state_dict()}  # written with AMP off
    for state in (saved, dict(saved, grad_scaler={})):  # and under bfloat16 (disabled scaler)
        trainer.load_state_dict(state)
        assert trainer.iter == 7 and trainer.grad_scaler.get_scale() == 4.0
    scaled = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaled.scale(torch.ones(1))  # a scaler's state is saved once it has scaled
    trainer.load_state_dict(dict(saved, grad_scaler=scaled.state_dict()))  # float16 to float16
    assert trainer.grad_scaler.get_scale() == 256.0


def test_lazy_partial_weights_refused_unless_opted_in(tmp_path):
    cfg = load_config(QUICK_PY, [*TINY, f"train.output_dir={tmp_path}"])
    model = instantiate(cfg.model)
    weights = str(tmp_path / "backbone.pth")
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, weights)
    with pytest.raises(CheckpointMismatchError, match="Set train.allow_partial_weights True"):
        startup.build_checkpointer(model, ConfigAdapter(cfg)).resume_or_load(weights)
    cfg.train.allow_partial_weights = True
    startup.build_checkpointer(model, ConfigAdapter(cfg)).resume_or_load(weights)
    # Evaluation refuses tensors of another shape whatever train.allow_partial_weights says.
    state = model.state_dict()
    state["sem_seg_head.predictor.weight"] = torch.zeros(1)
    misfit = str(tmp_path / "misfit.pth")
    torch.save({"model": state}, misfit)
    cfg.train.init_checkpoint = misfit
    with pytest.raises(CheckpointMismatchError, match="was made for another model") as e:
        startup.load_for_evaluation(model, ConfigAdapter(cfg), resume=False)
    # The keys to check are the LazyConfig's (they were the YAML config's), and evaluation has
    # no opt-in to skip misfits.
    assert "model.sem_seg_head.num_classes" in str(e.value) and "MODEL." not in str(e.value)
    assert "allow_partial_weights" not in str(e.value)


def test_lazy_run_refuses_partial_weights_before_training(tmp_path, data_root):
    cfg = load_config(QUICK_PY, TINY)
    model = instantiate(cfg.model)
    weights = str(tmp_path / "backbone.pth")
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, weights)
    out_dir = tmp_path / "run"
    # A checkpoint write killed by an earlier run left its temporary file: removed under the lock.
    stale = killed_writers_temporary(str(out_dir / "model_0000001.pth"))
    os.makedirs(out_dir, exist_ok=True)
    open(stale, "wb").close()
    args = [*TINY, "train.max_iter=2", f"train.init_checkpoint={weights}"]
    proc = train_net([*args, f"train.output_dir={out_dir}"], data_root, config_file=QUICK_PY)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert f"Checkpoint '{weights}' lacks" in out and "train.allow_partial_weights" in out
    assert "Starting training" not in out
    assert not os.path.exists(stale)
    assert os.path.exists(out_dir / ".train_net.lock")
    with open(out_dir / "log.txt") as f:  # our loggers reach log.txt, after the data check ran
        assert "efficientps_d2.data.check INFO: Checked data set 'synthetic_panoptic_train'" in (
            f.read()
        )


def test_lazy_run_refuses_a_bad_panoptic_png_before_training(tmp_path, data_root):
    root, png = data_with_grayscale_png(tmp_path, data_root)
    out_dir = tmp_path / "run"
    args = [*TINY, "train.max_iter=2", f"train.output_dir={out_dir}"]
    proc = train_net(args, str(root), config_file=QUICK_PY)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert f"Panoptic PNG '{png}' has mode L" in out
    assert "Starting training" not in out
    assert not list(out_dir.glob("*.pth"))


def test_lazy_vis_period_draws_the_same_picture_inputs_as_vis_period():
    yaml_cfg = load_config(QUICK_YAML, ["VIS_PERIOD", "3"])
    py_cfg = load_config(QUICK_PY, ["train.vis_period=3"])
    hooks = [add_panoptic_visualization(c, [])[0] for c in (yaml_cfg, py_cfg)]
    assert [(h._period, h._dataset_name, h._input_format) for h in hooks] == 2 * [
        (3, "synthetic_panoptic_train", "RGB")
    ]
    for height, width in ((128, 192), (100, 300), (400, 200)):
        image = np.zeros((height, width, 3), np.uint8)
        shapes = set()
        for hook in hooks:
            aug_input = T.AugInput(image)
            hook._augmentations(aug_input)
            shapes.add(aug_input.image.shape)
        assert len(shapes) == 1, shapes
    assert add_panoptic_visualization(load_config(QUICK_PY), []) == []  # vis_period 0: none


def test_lazy_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    settings = ConfigAdapter(load_config(QUICK_PY, [f"train.output_dir={tmp_path}"]))
    model = torch.nn.Linear(2, 2)
    checkpointer = startup.build_checkpointer(model, settings)
    checkpointer.save("model_0000001")
    intact = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    checkpointer.save("model_0000002")
    with open(tmp_path / "model_0000002.pth", "r+b") as f:  # killed while the disk filled up
        f.truncate(10)
    os.utime(tmp_path / "model_0000001.pth", (1, 1))  # older
    startup.build_checkpointer(model, settings).resume_or_load(settings.weights, resume=True)
    assert torch.equal(model.weight, intact)


@pytest.mark.parametrize(
    "kind, opts, key",
    [
        (".py", ["train.output_dir={out}"], "train.init_checkpoint is empty"),
        (".yaml", ["OUTPUT_DIR", "{out}"], "MODEL.WEIGHTS is empty"),
    ],
)
def test_eval_only_without_weights_is_refused_before_anything_is_written(tmp_path, kind, opts, key):
    # Detectron2 evaluates a randomly initialised model then, with exit status 0.
    out = tmp_path / "out"
    opts = [o.format(out=out) for o in opts]
    config_file = QUICK_PY[: -len(".py")] + kind
    for extra, why in (
        ([], ""),
        (["--resume"], f" and {out} holds no checkpoint to --resume from"),
    ):
        args = _quick_args(kind, "--eval-only", *extra, *opts)
        with pytest.raises(ValueError) as e:
            startup.setup(args)
        assert f"--eval-only has no weights to evaluate: {key}{why}. Name" in str(e.value)
    assert not out.exists()
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")  # --resume would evaluate it
    startup.check_weights(
        ConfigAdapter(load_config(config_file, opts)), eval_only=True, resume=True
    )


@pytest.mark.parametrize(
    "kind, opts",
    [
        (".py", ["train.output_dir={out}", "train.init_checkpoint={weights}"]),
        (".yaml", ["OUTPUT_DIR", "{out}", "MODEL.WEIGHTS", "{weights}"]),
    ],
)
def test_missing_weights_file_is_refused_before_the_data_check(tmp_path, kind, opts):
    # It was found by the checkpointer, after the data check (minutes on Cityscapes) and the
    # model and loaders were built.
    out, weights = tmp_path / "out", tmp_path / "no_such.pth"
    opts = [o.format(out=out, weights=weights) for o in opts]
    key = "train.init_checkpoint" if kind == ".py" else "MODEL.WEIGHTS"
    for extra in ([], ["--eval-only"], ["--resume"]):
        argv = [*extra, *opts]
        with pytest.raises(FileNotFoundError, match=f"'{weights}' \\({key}\\) does not exist"):
            startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, opts, key",
    [
        (".py", ["train.output_dir={out}"], "train.output_dir"),
        (".yaml", ["OUTPUT_DIR", "{out}"], "OUTPUT_DIR"),
    ],
)
def test_an_output_dir_that_is_a_file_is_refused_naming_the_key(tmp_path, kind, opts, key):
    # os.makedirs failed with a bare "[Errno 17] File exists" (training) or "[Errno 20] Not a
    # directory: '.../log.txt'" (--eval-only), naming no key.
    a_file = tmp_path / "a_file"
    a_file.write_text("notes")
    broken_link = tmp_path / "broken_link"  # os.makedirs fails under it too
    broken_link.symlink_to(tmp_path / "gone")
    for out, message in (
        (a_file, f"The {key} '{a_file}' is a file, not a folder"),
        (a_file / "run", f"Cannot make the {key} '{a_file / 'run'}': '{a_file}' is not a folder"),
        (
            broken_link / "run",
            f"Cannot make the {key} '{broken_link / 'run'}': '{broken_link}' is not a folder",
        ),
        (broken_link, f"The {key} '{broken_link}' is a broken symbolic link, not a folder"),
    ):
        argv = [o.format(out=out) for o in opts]
        for extra in ([], ["--eval-only"]):
            args = _quick_args(kind, *extra, *argv)
            with pytest.raises(NotADirectoryError) as error:
                startup.setup(args)
            assert str(error.value).startswith(message + ". Set it to a folder (e.g. "), error
    assert a_file.read_text() == "notes"


def test_a_read_only_output_dir_is_refused_naming_the_key(read_only_folder):
    # Training failed on its lock file, --eval-only on log.txt, with a bare "Permission denied".
    for out in (read_only_folder, read_only_folder / "run"):
        for extra in ([], ["--eval-only"]):
            args = _quick_args(".yaml", *extra, "OUTPUT_DIR", str(out))
            with pytest.raises(NotADirectoryError) as error:
                startup.setup(args)
            assert str(error.value).startswith(
                f"Cannot write the OUTPUT_DIR '{out}': '{read_only_folder}' is not writable"
            )


@pytest.mark.parametrize("kind", [".py", ".yaml"])
def test_a_weight_file_that_is_not_a_checkpoint_is_refused_before_the_data_check(tmp_path, kind):
    # The checkpointer named it too, but only after the data check (minutes on Cityscapes) and
    # the model and loaders were built.
    from efficientps_d2.checkpoint import CheckpointFileError, check_checkpoint_file

    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(64)}}, whole)
    faults = {
        "empty.pth": (b"", "an empty file"),
        "cut.pth": (whole.read_bytes()[:300], "a zip archive (torch's checkpoint format) that is"),
        "page.pth": (b"\n<!DOCTYPE html><html>Sign in", "a text file"),
    }
    out, key = tmp_path / "out", "train.init_checkpoint" if kind == ".py" else "MODEL.WEIGHTS"
    for name, (data, words) in faults.items():
        (tmp_path / name).write_bytes(data)
        opts = (
            [f"train.output_dir={out}", f"train.init_checkpoint={tmp_path / name}"]
            if kind == ".py"
            else ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(tmp_path / name)]
        )
        for extra in ([], ["--eval-only"]):
            argv = [*extra, *opts]
            with pytest.raises(CheckpointFileError) as e:
                startup.setup(_quick_args(kind, *argv))
            assert f"Checkpoint '{tmp_path / name}' ({key}) cannot be loaded: it is {words}" in (
                str(e.value)
            )
    assert not out.exists()
    # A folder (the run's output folder instead of its model_final.pth): "does not exist" before.
    with pytest.raises(IsADirectoryError, match=f"'{tmp_path}' \\(MODEL.WEIGHTS\\) is a folder"):
        check_checkpoint_file(str(tmp_path))
    # What may be a checkpoint is left to the loader: torch's zip, a pickle (.pkl).
    check_checkpoint_file(str(whole))
    (tmp_path / "legacy.pkl").write_bytes(b"\x80\x02}q\x00.")
    check_checkpoint_file(str(tmp_path / "legacy.pkl"))


def test_a_fetched_weight_url_whose_copy_is_not_a_checkpoint_is_refused(tmp_path, monkeypatch):
    # The URL was fetched at start-up but its copy not looked at: an HTML error page (proxy,
    # sign-in) failed after the data check and the model were built, and stayed in the cache.
    from detectron2.utils.file_io import PathManager

    from efficientps_d2.checkpoint import CheckpointFileError

    url = "https://example.com/models/model_final.pth"
    cached = tmp_path / "iopath_cache" / "model_final.pth"
    cached.parent.mkdir()
    fetched = []
    monkeypatch.setattr(
        PathManager, "get_local_path", lambda path, **kw: fetched.append(path) or str(cached)
    )
    config = ConfigAdapter(
        load_config(QUICK_YAML, ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", url])
    )
    cached.write_bytes(b"<!DOCTYPE html><html><body>Proxy sign-in</body></html>")
    with pytest.raises(CheckpointFileError) as e:
        startup.check_weights(config, eval_only=False, resume=False)
    assert fetched == [url]
    assert (
        f"Checkpoint '{url}' (MODEL.WEIGHTS) cannot be loaded: its downloaded copy '{cached}' is "
        "a text file" in str(e.value)
    )
    assert "Delete that copy" in str(e.value)
    torch.save({"model": {"w": torch.zeros(4)}}, cached)  # a real checkpoint passes
    startup.check_weights(config, eval_only=True, resume=False)


@pytest.mark.parametrize(
    "kind, opts, words",
    [
        (".py", ["dataloader.test.dataset.names=[]"], "dataloader.test.dataset.names names no"),
        (".py", ["~dataloader.evaluator"], "the config has no dataloader.evaluator"),
        (".yaml", ["DATASETS.TEST", "()"], "DATASETS.TEST names no data set"),
    ],
)
def test_eval_only_with_nothing_to_evaluate_is_refused(tmp_path, kind, opts, words):
    # Detectron2 returned no results with exit status 0, silently (a LazyConfig without an
    # evaluator after a whole inference pass).
    out = tmp_path / "out"
    key = "train.output_dir=" if kind == ".py" else "OUTPUT_DIR "
    argv = ["--eval-only", *opts]
    argv += (f"{key}{out}").split(" ", 1) if kind == ".yaml" else [f"{key}{out}"]
    with pytest.raises(ValueError, match=f"--eval-only has nothing to evaluate: {words}"):
        startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, opts, message",
    [
        (".py", ["train.tta.min_sizes=128"], "train.tta.min_sizes must be a non-empty list"),
        (".py", ["train.tta.min_sizes=[]"], "train.tta.min_sizes must be a non-empty list"),
        (".py", ["train.tta.min_sizes=[128,0]"], r"must be .* positive sizes.*got \[128, 0\]"),
        (".yaml", ["TEST.AUG.MIN_SIZES", "()"], "TEST.AUG.MIN_SIZES must be a non-empty list"),
    ],
)
def test_unusable_test_time_augmentation_is_refused_before_training(tmp_path, kind, opts, message):
    # Test-time augmentation runs after training: "'int' object is not iterable" or "MIN_SIZES
    # must list positive sizes" came after the whole run.
    out = tmp_path / "out"
    if kind == ".py":
        opts = [*opts, "train.tta.enabled=True", f"train.output_dir={out}"]
    else:
        opts = [*opts, "TEST.AUG.ENABLED", "True", "OUTPUT_DIR", str(out)]
    argv = [*opts]
    with pytest.raises(ValueError, match=message):
        startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, opts, key",
    [
        (".py", ["train.expected_results=[[panoptic_seg,PQ,60.3]]"], "train.expected_results"),
        (".yaml", ["TEST.EXPECTED_RESULTS", "[['panoptic_seg', 60.3, 'PQ', 0.5]]"], "TEST.EXPE"),
    ],
)
def test_malformed_expected_results_are_refused_before_training(tmp_path, kind, opts, key):
    # Detectron2's verify_results failed to unpack the row after the whole run.
    out = tmp_path / "out"
    opts = [*opts, *([f"train.output_dir={out}"] if kind == ".py" else ["OUTPUT_DIR", str(out)])]
    argv = [*opts]
    with pytest.raises(ValueError, match=f"{key}.* has the row .*; each row is \\[task, metric"):
        startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, opts, words",
    [
        (".py", ["dataloader.test.dataset.names=[]"], "dataloader.test.dataset.names names no"),
        (".py", ["~dataloader.evaluator"], "the config has no dataloader.evaluator"),
        (".yaml", ["DATASETS.TEST", "()"], "DATASETS.TEST names no data set"),
    ],
)
def test_expected_results_with_nothing_evaluated_are_refused_before_training(
    tmp_path, kind, opts, words
):
    # Found after the whole training: "evaluated nothing" (LazyConfig), every metric missing
    # (YAML: DefaultTrainer's test() returned {}).
    out = tmp_path / "out"
    if kind == ".py":
        opts = [*opts, "train.expected_results=[[panoptic_seg,PQ,60.3,0.5]]"]
        opts += [f"train.output_dir={out}"]
        key = "train.expected_results"
    else:
        opts = [*opts, "TEST.EXPECTED_RESULTS", "[['panoptic_seg', 'PQ', 60.3, 0.5]]"]
        opts += ["OUTPUT_DIR", str(out)]
        key = "TEST.EXPECTED_RESULTS"
    argv = [*opts]
    with pytest.raises(
        ValueError, match=f"{key} is set but training would evaluate nothing: {words}"
    ):
        startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


def test_an_expected_task_that_was_not_evaluated_fails_the_verification():
    # Detectron2 raised KeyError: 'panoptic' after the whole run.
    cfg = load_config(QUICK_PY, ["train.expected_results=[[panoptic,PQ,60.3,0.5]]"])
    with pytest.raises(SystemExit):
        startup.verify_results(cfg, {"panoptic_seg": {"PQ": 60.3}})


def test_a_model_zoo_name_runs_as_its_file(tmp_path):
    # load_config took the name; Detectron2's default_setup then opened it as a path:
    # "FileNotFoundError: [Errno 2] No such file or directory: 'Synthetic-...quick.yaml'".
    from detectron2.engine import default_argument_parser

    name, out = "Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml", tmp_path / "out"
    args = default_argument_parser().parse_args(
        ["--config-file", name, "OUTPUT_DIR", str(out), "DATASETS.TRAIN", "('no_such_set',)"]
    )
    with pytest.raises(DataCheckError, match="no_such_set"):  # past default_setup
        startup.setup(args)
    assert os.path.samefile(args.config_file, QUICK_YAML) and (out / "config.yaml").is_file()


def test_the_mappers_read_images_in_the_models_channel_order():
    # model.input_format=BGR left the mappers reading RGB: the model saw swapped colours, silently.
    cfg = load_config(QUICK_PY, ["model.input_format=BGR"])
    assert cfg.dataloader.train.mapper.image_format == "BGR"
    assert instantiate(cfg.dataloader.test.mapper).image_format == "BGR"
    startup.check_input_format(cfg)
    cfg = load_config(QUICK_PY, ["dataloader.train.mapper.image_format=BGR"])
    with pytest.raises(ValueError, match="dataloader.train.mapper.image_format is 'BGR' but mod"):
        startup.check_input_format(cfg)
    r50 = load_config(
        os.path.join(CONFIGS, "Cityscapes-PanopticSegmentation", "efficientps_R_50.py")
    )
    assert r50.dataloader.test.mapper.image_format == r50.model.input_format == "BGR"


def test_yaml_training_verifies_expected_results_as_eval_only_does(monkeypatch):
    # DefaultTrainer.train used Detectron2's verify_results: KeyError 'panoptic' after training.
    from detectron2.engine import TrainerBase

    import train_net

    trainer = train_net.Trainer.__new__(train_net.Trainer)  # the model is not needed here
    expected = "[['panoptic', 'PQ', 60.3, 0.5]]"
    trainer.cfg = load_config(QUICK_YAML, ["TEST.EXPECTED_RESULTS", expected])
    trainer.start_iter = trainer.max_iter = 0
    trainer._last_eval_results = {"panoptic_seg": {"PQ": 60.3}}
    monkeypatch.setattr(TrainerBase, "train", lambda self, start_iter, max_iter: None)
    with pytest.raises(SystemExit):
        trainer.train()
    trainer.cfg = load_config(
        QUICK_YAML, ["TEST.EXPECTED_RESULTS", expected.replace("c'", "c_seg'")]
    )
    assert trainer.train() == trainer._last_eval_results


def test_no_evaluation_after_an_error_in_the_last_iteration():
    # Detectron2's EvalHook evaluated after training when iter + 1 >= max_iter, which also holds
    # after an error or Ctrl-C in the last iteration (e.g. a full disk saving model_final.pth):
    # the weights evaluated were never saved, and the error came after the evaluation.
    from detectron2.engine import EvalHook, TrainerBase, hooks

    class Steps(TrainerBase):
        def run_step(self):
            if self.iter == fail_at:
                raise interrupt("in the last iteration")

    for hook_class, fail_at, interrupt, evaluated in (
        (EvalHook, 2, RuntimeError, 1),  # Detectron2's
        (startup.FinishedTrainingEvalHook, 2, RuntimeError, 0),
        (startup.FinishedTrainingEvalHook, 2, KeyboardInterrupt, 0),
        (startup.FinishedTrainingEvalHook, None, None, 1),  # a finished training
    ):
        calls = []
        trainer = Steps()
        trainer.register_hooks([hook_class(0, lambda: calls.append(1) or {})])
        with contextlib.nullcontext() if interrupt is None else pytest.raises(interrupt):
            trainer.train(0, 3)
        assert len(calls) == evaluated, hook_class
    # Resumed from model_final.pth (the loop does not run): the evaluation runs.
    calls = []
    trainer = Steps()
    trainer.register_hooks([startup.FinishedTrainingEvalHook(0, lambda: calls.append(1) or {})])
    trainer.train(3, 3)
    assert calls == [1]
    # train_net.py's trainer takes DefaultTrainer's hooks with this one in place of EvalHook.
    replaced = [startup.FinishedTrainingEvalHook.replacing(h) for h in (EvalHook(5, dict),)]
    assert type(replaced[0]) is startup.FinishedTrainingEvalHook and replaced[0]._period == 5
    timer = hooks.IterationTimer()
    assert startup.FinishedTrainingEvalHook.replacing(timer) is timer


@pytest.mark.parametrize(
    "kind, opts, key",
    [
        (".py", ["train.amp.enabled=True", "train.device=cpu"], "train.amp.enabled"),
        (".yaml", ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"], "SOLVER.AMP.ENABLED"),
    ],
)
def test_amp_training_on_the_cpu_is_refused_before_the_run(tmp_path, kind, opts, key):
    # Detectron2's AMPTrainer asserted "CUDA is required for AMP training!" at the first step.
    out = tmp_path / "out"
    opts = [*opts, *([f"train.output_dir={out}"] if kind == ".py" else ["OUTPUT_DIR", str(out)])]
    argv = [*opts]
    with pytest.raises(ValueError, match=f"{key} is True but the model runs on the CPU"):
        startup.setup(_quick_args(kind, *argv))
    assert not out.exists()


def test_an_unknown_gradient_clip_type_is_refused_naming_the_key(tmp_path):
    # Detectron2 raised "'bogus' is not a valid GradientClipType" after the data check.
    out = tmp_path / "out"
    opts = ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "bogus", "OUTPUT_DIR", str(out)]
    with pytest.raises(ValueError, match="SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of"):
        startup.setup(_quick_args(".yaml", *opts))
    assert not out.exists()


def _metrics_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_metrics_file_resumed_drops_the_records_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "loss": i / 10}) for i in (1, 3, 5, 7)]
    lines.insert(2, json.dumps({"note": "no iteration"}))  # not a training record: stays
    path.write_text("\n".join(lines) + '\n{"iteration": 9, "lo')  # cut short by the kill
    assert startup.prepare_metrics_file(str(tmp_path), 5) is None
    assert _metrics_lines(path) == lines[:3]
    assert os.listdir(tmp_path) == ["metrics.json"]  # rewritten atomically: no temporaries
    inode = path.stat().st_ino
    startup.prepare_metrics_file(str(tmp_path), 5)  # nothing to drop: not rewritten
    assert path.stat().st_ino == inode and _metrics_lines(path) == lines[:3]
    path.write_text(lines[0])  # whole but without its line end: the next record would join it
    startup.prepare_metrics_file(str(tmp_path), 5)
    assert path.read_text() == lines[0] + "\n"


def test_metrics_file_of_an_earlier_run_is_moved_aside_by_a_fresh_start(tmp_path):
    assert startup.prepare_metrics_file(str(tmp_path), 0) is None  # none yet
    (tmp_path / "metrics.json").write_text("")
    assert startup.prepare_metrics_file(str(tmp_path), 0) is None  # empty: nothing to keep
    moved = []
    for run in range(2):  # the same time stamp twice: the second name is made unique
        (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 19, "run": run}) + "\n")
        os.utime(tmp_path / "metrics.json", (0, 0))
        moved.append(startup.prepare_metrics_file(str(tmp_path), 0))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(0))
    assert moved == [
        str(tmp_path / f"metrics.{stamp}.json"),
        str(tmp_path / f"metrics.{stamp}-2.json"),
    ]
    assert [json.loads(_metrics_lines(p)[0])["run"] for p in moved] == [0, 1]
    assert not (tmp_path / "metrics.json").exists()


def _toy_training(output_dir, max_iter, *, resume, checkpoint_period):
    """A tiny SimpleTrainer with lazy_train.py's checkpoint and writer hooks, its writes every
    2 iterations; returns the iteration it started from."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import SimpleTrainer, hooks

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return {"loss": (self.w * batch).sum()}

    model = Toy()
    trainer = SimpleTrainer(
        model, itertools.repeat(torch.ones(1)), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    checkpointer = DetectionCheckpointer(model, str(output_dir), trainer=trainer)
    trainer.register_hooks(
        [
            hooks.PeriodicCheckpointer(checkpointer, checkpoint_period, max_iter=max_iter),
            startup.ResumingPeriodicWriter(
                str(output_dir),
                functools.partial(startup.build_writers, str(output_dir), max_iter),
                period=2,
            ),
        ]
    )
    checkpointer.resume_or_load("", resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, max_iter)
    return start_iter


def test_resumed_training_logs_each_iteration_once_in_metrics_and_tensorboard(tmp_path):
    # Detectron2's writers appended the resumed run's records after those the killed run logged
    # after its last checkpoint: iterations 5 and 7 twice, in metrics.json and in tensorboard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _toy_training(tmp_path, 8, resume=False, checkpoint_period=4)  # records 1, 3, 5, 7
    # The folder that a run killed after logging iteration 7 with its checkpoint of iteration 3
    # leaves: the later checkpoints go.
    for name in ("model_0000007.pth", "model_final.pth"):
        os.remove(tmp_path / name)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    time.sleep(1)  # tensorboard's event files are named by the second they are opened in
    assert _toy_training(tmp_path, 8, resume=True, checkpoint_period=4) == 4
    records = [json.loads(line) for line in _metrics_lines(tmp_path / "metrics.json")]
    assert [r["iteration"] for r in records] == [1, 3, 5, 7]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("total_loss")] == [1, 3, 5, 7]
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2  # nothing deleted

    # A fresh start (no --resume) keeps that run's records under another name.
    _toy_training(tmp_path, 4, resume=False, checkpoint_period=4)
    records = [json.loads(line) for line in _metrics_lines(tmp_path / "metrics.json")]
    assert [r["iteration"] for r in records] == [1, 3]
    (earlier,) = glob.glob(str(tmp_path / "metrics.*-*.json"))
    assert [json.loads(line)["iteration"] for line in _metrics_lines(earlier)] == [1, 3, 5, 7]


def test_the_saved_config_is_written_atomically_and_named_in_the_log(tmp_path, caplog):
    from detectron2.utils.file_io import PathManager

    saved = tmp_path / "config.yaml"
    saved.write_text("the training's config\n")
    open_in_place = PathManager.open
    with startup.saved_config_redirected(str(tmp_path)):
        with pytest.raises(RuntimeError):  # e.g. a dump that fails half way
            with PathManager.open(str(saved), "w") as f:
                f.write("half of")
                raise RuntimeError
    assert saved.read_text() == "the training's config\n"  # Detectron2 left "half of" there
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert PathManager.open == open_in_place  # restored
    with startup.saved_config_redirected(str(tmp_path), "config_eval.yaml"):
        with PathManager.open(str(saved), "w") as f:
            f.write("the evaluation's config\n")
        with PathManager.open(str(saved)) as f:  # reading is not redirected
            assert f.read() == "the training's config\n"
        with caplog.at_level(logging.INFO, logger="detectron2"):
            logging.getLogger("detectron2").info(f"Full config saved to {saved}")
    assert (tmp_path / "config_eval.yaml").read_text() == "the evaluation's config\n"
    assert caplog.records[-1].getMessage().endswith("config_eval.yaml")


@pytest.mark.parametrize(
    "kind, opts",
    [
        (".py", ["train.output_dir={out}", "dataloader.test.dataset.names=no_such_set"]),
        (".yaml", ["OUTPUT_DIR", "{out}", "DATASETS.TEST", "('no_such_set',)"]),
    ],
)
def test_eval_only_into_a_training_folder_keeps_the_training_config(tmp_path, kind, opts):
    # Detectron2's default_setup replaced the training's config.yaml with the evaluation's; the
    # folder's config.yaml describes the run that made its checkpoints.
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the training's config\n")
    (out / "last_checkpoint").write_text("model_final.pth")  # --eval-only --resume evaluates it
    args = _quick_args(kind, "--eval-only", "--resume", *[o.format(out=out) for o in opts])
    with pytest.raises(DataCheckError, match="no_such_set"):  # past default_setup
        startup.setup(args)
    assert (out / "config.yaml").read_text() == "the training's config\n"
    assert "no_such_set" in (out / "config_eval.yaml").read_text()
