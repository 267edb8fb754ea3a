"""Weight files that are not checkpoints; partial weights in training; resuming past bad files."""

import logging
import os

import pytest
import torch
from detectron2.modeling import build_model

from efficientps_d2.checkpoint import (
    CheckpointFileError,
    CheckpointMismatchError,
    EfficientPSCheckpointer,
)
from tests.common import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def full_checkpoint(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "full.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _truncated(tmp_path, full_checkpoint):
    with open(full_checkpoint, "rb") as f:
        data = f.read()
    return _write(tmp_path / "truncated.pth", data[: len(data) // 3])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p, _: _write(p / "empty.pth", b""), "an empty file (0 bytes)"),
        (lambda p, _: _write(p / "page.pth", b"<!DOCTYPE html>\n<html>"), "a text file"),
        (
            lambda p, _: _write(p / "noise.pth", bytes(range(200, 256)) * 4),
            "not a checkpoint: unknown binary data",
        ),
        (_truncated, "a zip archive (torch's checkpoint format) that is truncated or corrupt"),
        (lambda p, _: _write(p / "legacy.pth", b"\x80\x02}q\x00"), "a pickle"),
    ],
)
def test_unreadable_weight_file_named_and_described(model, full_checkpoint, tmp_path, make, words):
    path = make(tmp_path, full_checkpoint)
    with pytest.raises(CheckpointFileError) as e:
        EfficientPSCheckpointer(model).load(path)
    message = str(e.value)
    assert f"Checkpoint '{path}' cannot be loaded: it is {words}" in message
    assert "weights_only=False" not in message and "weights_only` set to False" not in message


def test_weight_file_holding_a_tensor_is_refused(model, tmp_path):
    path = str(tmp_path / "tensor.pth")
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointFileError, match="holds a Tensor, not a state dict"):
        EfficientPSCheckpointer(model).load(path)


def test_training_refuses_partial_weights_unless_known_kind_or_asked(model, tmp_path, caplog):
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up")}
    plain = str(tmp_path / "backbone.pth")
    torch.save({"model": backbone}, plain)
    with pytest.raises(CheckpointMismatchError, match="MODEL.ALLOW_PARTIAL_WEIGHTS") as e:
        EfficientPSCheckpointer(model, allow_missing=False).load(plain)
    assert plain in str(e.value) and "sem_seg_head" in str(e.value)

    # The converter's output is partial by design, and so accepted.
    converted = str(tmp_path / "converted.pth")
    author = "efficientps_d2.tools.convert_torchvision_weights (efficientnet_b0)"
    torch.save({"model": backbone, "__author__": author, "matching_heuristics": False}, converted)
    with caplog.at_level(logging.INFO, logger="efficientps_d2"):
        checkpointer = EfficientPSCheckpointer(model, allow_missing=False)
        checkpointer.load(converted)
    assert checkpointer.last_report.loaded == len(backbone)
    # The log says which tensors were loaded, grouped by module.
    assert f"Loaded {len(backbone)} tensors from '{converted}': backbone.bottom_up (" in caplog.text

    # A full checkpoint without BatchNorm's step counters (frozen BN) is not partial.
    no_counters = str(tmp_path / "no_counters.pth")
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"model": state}, no_counters)
    EfficientPSCheckpointer(model, allow_missing=False).load(no_counters)

    # Asking for it (MODEL.ALLOW_PARTIAL_WEIGHTS) accepts the plain file too.
    EfficientPSCheckpointer(model, allow_missing=True).load(plain)

    # Another author (Detectron2's model zoo files have one) does not make a checkpoint partial.
    other = str(tmp_path / "other_author.pth")
    torch.save({"model": backbone, "__author__": "Detectron2 Model Zoo"}, other)
    with pytest.raises(CheckpointMismatchError, match="MODEL.ALLOW_PARTIAL_WEIGHTS"):
        EfficientPSCheckpointer(model, allow_missing=False).load(other)


def test_resume_falls_back_to_newest_intact_checkpoint(model, tmp_path, caplog):
    checkpointer = EfficientPSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000003", iteration=3)
    os.utime(tmp_path / "model_0000001.pth", (1, 1))  # older on coarse-mtime file systems too
    last = tmp_path / "model_0000003.pth"
    last.write_bytes(last.read_bytes()[:1000])  # truncated (e.g. a bad copy of the folder)

    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        checkpoint = EfficientPSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 1
    assert f"Cannot resume from '{last}'" in caplog.text
    assert "newest intact checkpoint" in caplog.text

    # An empty last_checkpoint (fvcore's, written in place, cut short): the same fallback. It was
    # taken for the folder, and --resume stopped with "Checkpoint '<folder>/' (MODEL.WEIGHTS) is
    # a folder".
    tag = tmp_path / "last_checkpoint"
    tag.write_text("")
    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        checkpoint = EfficientPSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 1
    assert f"'{tag}' names no checkpoint file" in caplog.text
    assert f"checkpoint in '{tmp_path}'." in caplog.text
    tag.write_text("model_0000003.pth")

    # last_checkpoint naming a file that is gone: the same fallback.
    last.unlink()
    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        checkpoint = EfficientPSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 1

    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(CheckpointFileError, match="No intact checkpoint"):
        EfficientPSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


def test_resume_falls_back_to_the_newest_intact_checkpoint_not_a_temporary_file(model, tmp_path):
    """Of several intact older checkpoints the newest is resumed from, and never the temporary
    file of a save that was killed before its rename (hidden, "<name>.<hex>.tmp.pth")."""
    checkpointer = EfficientPSCheckpointer(model, str(tmp_path))
    for iteration in (1, 2, 3):
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    os.utime(tmp_path / "model_0000001.pth", (1, 1))
    os.utime(tmp_path / "model_0000002.pth", (2, 2))
    last = tmp_path / "model_0000003.pth"
    temporary = tmp_path / ".model_0000004.pth.0123456789ab.tmp.pth"
    temporary.write_bytes(last.read_bytes())  # intact, and the newest file of the folder
    last.write_bytes(last.read_bytes()[:1000])
    checkpoint = EfficientPSCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 2


def test_only_the_process_that_saves_to_disk_writes(model, tmp_path):
    """Detectron2 gives save_to_disk=False to every process but the main one: the others write
    nothing (not even last_checkpoint)."""
    EfficientPSCheckpointer(model, str(tmp_path), save_to_disk=False).save("model_0000001")
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_whose_tensors_all_have_other_shapes_names_the_shapes(model, tmp_path):
    path = str(tmp_path / "other_classes.pth")
    torch.save({"model": {"sem_seg_head.predictor.weight": torch.zeros(3, 3, 1, 1)}}, path)
    with pytest.raises(CheckpointMismatchError, match="1 tensors have other shapes"):
        EfficientPSCheckpointer(model, allow_missing=True).load(path)


def test_resume_refuses_a_checkpoint_of_another_config_even_with_partial_weights(model, tmp_path):
    # MODEL.ALLOW_PARTIAL_WEIGHTS is for the weights a run starts from. On --resume it skipped the
    # misfit tensors, loaded the old optimizer's momentum of other shapes, and the run stopped at
    # its first step with "The size of tensor a (32) must match the size of tensor b (48)".
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    EfficientPSCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000003")
    path = str(tmp_path / "model_0000003.pth")
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["model"]["sem_seg_head.predictor.weight"] = torch.zeros(1)  # another model
    torch.save(checkpoint, path)

    def resume(**checkpointables):
        checkpointer = EfficientPSCheckpointer(
            model, str(tmp_path), allow_shape_mismatch=True, allow_missing=True, **checkpointables
        )
        return checkpointer.resume_or_load("", resume=True)

    with pytest.raises(CheckpointMismatchError, match="--resume continues the run in") as e:
        resume(optimizer=optimizer)
    assert f"Checkpoint '{path}' was made for another model" in str(e.value)
    evaluation = EfficientPSCheckpointer(model, str(tmp_path), for_evaluation=True)
    with pytest.raises(CheckpointMismatchError, match="--resume evaluates the last checkpoint"):
        evaluation.resume_or_load("", resume=True)  # --eval-only --resume

    # The same tensors, but the optimizer's parameters grouped otherwise (SOLVER settings):
    # torch's bare "loaded state dict has a different number of parameter groups" before.
    checkpoint["model"] = model.state_dict()
    torch.save(checkpoint, path)
    regrouped = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    with pytest.raises(CheckpointMismatchError, match=f"Cannot resume from '{path}'") as e:
        resume(optimizer=regrouped)
    assert "different number of parameter groups" in str(e.value)
    assert "model" not in resume(optimizer=optimizer)  # the run's own config resumes


@pytest.mark.parametrize(
    "kind, shape_key, grouping_key",
    [
        ("yaml", "MODEL.TWO_WAY_FPN.OUT_CHANNELS", "SOLVER.BIAS_LR_FACTOR"),
        ("lazy", "model.backbone.out_channels", "optimizer.params.bias_lr_factor"),
    ],
)
def test_the_checkpointer_names_the_settings_of_the_configs_kind(
    model, tmp_path, kind, shape_key, grouping_key
):
    from efficientps_d2.config_adapter import ConfigAdapter
    from efficientps_d2.engine import load_config
    from tests.test_lazy_config import QUICK_PY

    config = ConfigAdapter(tiny_config() if kind == "yaml" else load_config(QUICK_PY))
    params = [p for p in model.parameters() if p.requires_grad]
    config.checkpointer(model, str(tmp_path), optimizer=torch.optim.SGD(params, lr=0.1)).save(
        "model_0000001"
    )
    misfit = {k: torch.zeros(1) if "predictor" in k else v for k, v in model.state_dict().items()}
    torch.save({"model": misfit}, tmp_path / "misfit.pth")
    with pytest.raises(CheckpointMismatchError, match=f"Check the backbone .*{shape_key}"):
        config.checkpointer(model).load(str(tmp_path / "misfit.pth"))
    regrouped = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    checkpointer = config.checkpointer(model, str(tmp_path), optimizer=regrouped)
    with pytest.raises(CheckpointMismatchError, match=f"otherwise \\({grouping_key}, "):
        checkpointer.resume_or_load("", resume=True)


def test_resume_warns_that_it_restores_the_saved_optimizer_settings(tmp_path, caplog):
    # torch restores the saved learning rate and weight decay: a run resumed with another
    # SOLVER.BASE_LR trained on at the old one, without a word.
    from detectron2.engine import SimpleTrainer

    def resume(lr, weight_decay=1e-4, save=False):
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
        trainer = SimpleTrainer(model, [], optimizer)
        checkpointer = EfficientPSCheckpointer(model, str(tmp_path), trainer=trainer)
        if save:
            checkpointer.save("model_0000001")
        with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
            checkpointer.resume_or_load("", resume=True)
        return optimizer.param_groups[0]

    resume(0.01, save=True)
    assert "restores the optimizer settings" not in caplog.text
    group = resume(0.05, weight_decay=0.0)
    assert group["lr"] == 0.01  # Detectron2's behaviour, kept; the log says so
    assert (
        "restores the optimizer settings it was saved with: base learning rate [0.01] (the config "
        "gives [0.05]); weight decay [0.0001] (the config gives [0.0])" in caplog.text
    )
    assert f"MODEL.WEIGHTS set to '{tmp_path / 'model_0000001.pth'}'" in caplog.text


def test_evaluation_refuses_weights_that_leave_tensors_random(model, full_checkpoint, tmp_path):
    # --eval-only scored a backbone-only file, heads random, with exit status 0 and a warning.
    from efficientps_d2.config_adapter import ConfigAdapter
    from efficientps_d2.engine.startup import load_for_evaluation

    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    plain, converted = str(tmp_path / "backbone.pth"), str(tmp_path / "converted.pth")
    torch.save({"model": backbone}, plain)
    author = "efficientps_d2.tools.convert_torchvision_weights (efficientnet_b0)"
    torch.save({"model": backbone, "__author__": author}, converted)
    for weights in (plain, converted):  # a converted ImageNet backbone too: its heads are random
        config = ConfigAdapter(tiny_config(["MODEL.WEIGHTS", weights]))
        with pytest.raises(CheckpointMismatchError, match="would be evaluated with random values"):
            load_for_evaluation(model, config, resume=False)
        config.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = True  # asked for
        load_for_evaluation(model, config, resume=False)
    load_for_evaluation(
        model, ConfigAdapter(tiny_config(["MODEL.WEIGHTS", full_checkpoint])), resume=False
    )
