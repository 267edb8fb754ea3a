"""torchvision EfficientNet -> EfficientPS backbone weights; checkpoints that do not fit."""

import logging
import os

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from efficientps_d2.checkpoint import CheckpointMismatchError, EfficientPSCheckpointer
from efficientps_d2.tools.convert_torchvision_weights import (
    BACKBONE_PREFIX,
    WeightConversionError,
    convert_torchvision_efficientnet,
    main,
)
from tests.common import CONFIGS, tiny_config


@pytest.fixture(scope="module")
def torchvision_b0():
    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(weights=None).state_dict()


def test_cli_maps_every_backbone_tensor_and_skips_se_and_classifier(
    tmp_path, torchvision_b0, capsys
):
    torch.save(torchvision_b0, tmp_path / "tv.pth")
    killed = tmp_path / ".d2.0123456789ab.tmp.pth"  # what a killed conversion left
    killed.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert main(["--variant", "b0", str(tmp_path / "tv.pth"), str(tmp_path / "d2.pth")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["d2.pth", "tv.pth"]
    out = capsys.readouterr().out
    assert "Skipped 64 squeeze-excitation tensors" in out
    assert "Skipped 2 classifier tensors" in out
    assert "randomly initialised: the 2-way FPN" in out

    checkpoint = torch.load(tmp_path / "d2.pth", weights_only=True)
    assert checkpoint["matching_heuristics"] is False and "__author__" in checkpoint
    torch.manual_seed(1)
    model = build_model(tiny_config())
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    assert set(checkpoint["model"]) == set(trunk)
    before = {k: v.clone() for k, v in model.state_dict().items() if k not in trunk}
    DetectionCheckpointer(model).load(str(tmp_path / "d2.pth"))
    state = model.state_dict()
    for name in trunk:
        assert torch.equal(state[name], torchvision_b0[name[len(BACKBONE_PREFIX) :]]), name
    # Everything else (FPN, heads) keeps its initial values.
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_squeeze_excitation_is_kept_when_the_model_keeps_it(tmp_path, torchvision_b0):
    checkpoint, report = convert_torchvision_efficientnet(
        torchvision_b0, "b0", squeeze_excitation=True
    )
    assert list(report.skipped) == ["classifier"]
    torch.save(checkpoint, tmp_path / "se.pth")
    model = build_model(tiny_config(["MODEL.EFFICIENTNET.SQUEEZE_EXCITATION", True]))
    checkpointer = EfficientPSCheckpointer(model)
    checkpointer.load(str(tmp_path / "se.pth"))
    assert checkpointer.last_report.loaded == len(torchvision_b0) - 2
    assert torch.equal(
        model.backbone.bottom_up.features[1][0].block[1].fc1.weight,
        torchvision_b0["features.1.0.block.1.fc1.weight"],
    )


def test_an_input_that_is_not_a_torch_file_is_described(tmp_path, capsys):
    # An empty file said only "Cannot read 'empty.pth' as a torch file: " (EOFError's message).
    (tmp_path / "empty.pth").write_bytes(b"")
    assert main(["--variant", "b0", str(tmp_path / "empty.pth"), str(tmp_path / "out.pth")]) != 0
    assert "as a torch file: it is an empty file (0 bytes) (the data ends early)." in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out.pth").exists()


def test_an_output_that_is_a_folder_or_the_input_is_refused(tmp_path, torchvision_b0, capsys):
    # A folder ended in an IsADirectoryError traceback; the input was replaced by the output.
    torch.save(torchvision_b0, tmp_path / "tv.pth")
    before = (tmp_path / "tv.pth").read_bytes()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for output, message in [
        ("folder", "checkpoint '" + str(tmp_path / "folder") + "' is a folder, not a file"),
        ("tv.pth", "is the input: writing it would replace torchvision's file"),
        ("file/out.pth", "out.pth': '" + str(tmp_path / "file") + "' is not a folder"),
    ]:
        assert main(["--variant", "b0", str(tmp_path / "tv.pth"), str(tmp_path / output)]) == 1
        assert message in capsys.readouterr().err
    assert (tmp_path / "tv.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["file", "folder", "tv.pth"]
    assert os.listdir(tmp_path / "folder") == []


def test_a_config_without_efficientnet_is_refused(tmp_path, torchvision_b0, capsys):
    # The R-50 config's unused MODEL.EFFICIENTNET.VARIANT (b5) refused a B0 file with B5's shapes,
    # or a B5 file was written and then found to fit nothing in the model.
    torch.save(torchvision_b0, tmp_path / "tv.pth")
    config = os.path.join(CONFIGS, "Cityscapes-PanopticSegmentation", "efficientps_R_50.yaml")
    assert main(["--config-file", config, str(tmp_path / "tv.pth"), str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert "does not build on EfficientNet" in err and "'build_resnet_backbone'" in err
    assert not (tmp_path / "o.pth").exists()


def test_another_variant_is_refused_with_the_shapes_named(torchvision_b0):
    b2 = torchvision.models.efficientnet_b2(weights=None).state_dict()
    with pytest.raises(WeightConversionError) as e:
        convert_torchvision_efficientnet(b2, "b0")
    message = str(e.value)
    assert "have other shapes" in message and "'features.0.0.weight' (32, 3, 3, 3)" not in message
    assert "(48, 144, 1, 1) (expected (40, 144, 1, 1))" in message
    assert "looks like torchvision efficientnet_b2" in message
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(WeightConversionError, match="not a torchvision EfficientNet.*conv1"):
        convert_torchvision_efficientnet(resnet, "b0")
    with pytest.raises(WeightConversionError, match="missing"):
        convert_torchvision_efficientnet(
            {k: v for k, v in torchvision_b0.items() if "features.8" not in k}, "b0"
        )


def test_loading_a_checkpoint_of_another_architecture_is_refused(tmp_path, torchvision_b0, caplog):
    """EfficientPSCheckpointer raises for other variants/architectures; Detectron2 only warns."""
    model = build_model(tiny_config())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    b5 = torchvision.models.efficientnet_b5(weights=None).state_dict()
    checkpoint, _ = convert_torchvision_efficientnet(b5, "b5")
    torch.save(checkpoint, tmp_path / "b5_backbone.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        EfficientPSCheckpointer(model).load(str(tmp_path / "b5_backbone.pth"))
    assert "backbone.bottom_up.features.0.0.weight' (48, 3, 3, 3) in the checkpoint vs " in str(
        e.value
    )
    assert "MODEL.EFFICIENTNET.VARIANT" in str(e.value)
    # Refused before anything was copied.
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointMismatchError, match="none of its 122 tensor names.*ResNet"):
        EfficientPSCheckpointer(model).load(str(tmp_path / "r18.pth"))
    torch.save(torchvision_b0, tmp_path / "tv_b0.pth")
    with pytest.raises(CheckpointMismatchError, match="convert_torchvision_weights"):
        EfficientPSCheckpointer(model).load(str(tmp_path / "tv_b0.pth"))

    # Opting in skips the mismatched tensors with one grouped warning.
    checkpointer = EfficientPSCheckpointer(model, allow_shape_mismatch=True)
    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        checkpointer.load(str(tmp_path / "b5_backbone.pth"))
    report = checkpointer.last_report
    assert report.incorrect_shapes and report.loaded < len(checkpoint["model"])
    assert "keep their initial (random) values: backbone.bottom_up" in caplog.text
