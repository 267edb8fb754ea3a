"""MODEL.WEIGHTS "torchvision://efficientnet_bN": resolved, converted and loaded without network."""

import logging
import os

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from efficientps_d2.checkpoint import EfficientPSCheckpointer
from efficientps_d2.torchvision_weights import (
    PretrainedWeightsUnavailable,
    TorchvisionEfficientNetHandler,
    _download,
    register_torchvision_handler,
    resolve_weights,
)

from .common import config_file, load_config, tiny_config

B0_FILE = "efficientnet_b0_rwightman-7f5810bc.pth"  # torchvision's name for the B0 weights


@pytest.fixture
def handler(tmp_path):
    """A handler reading torch's hub folder under tmp_path, whose downloads always fail."""
    calls = []

    def offline(weights):
        calls.append(weights)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    handler = TorchvisionEfficientNetHandler(
        hub_dir=str(tmp_path / "hub"), cache_dir=str(tmp_path / "cache"), download=offline
    )
    handler.download_calls = calls
    register_torchvision_handler(handler)
    yield handler
    register_torchvision_handler()  # the default handler again


@pytest.fixture(scope="module")
def torchvision_b0():
    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(weights=None).state_dict()


def test_names_resolve_to_torchvision_weights():
    variant, weights = resolve_weights("efficientnet_b5")
    assert (variant, os.path.basename(weights.url)) == (
        "b5",
        "efficientnet_b5_lukemelas-1a07897c.pth",
    )
    assert resolve_weights("EfficientNet_B0_Weights.IMAGENET1K_V1")[0] == "b0"
    variant, weights = resolve_weights("EfficientNet_B5_Weights.IMAGENET1K_V1")
    assert (variant, os.path.basename(weights.url)) == (
        "b5",
        "efficientnet_b5_lukemelas-1a07897c.pth",
    )
    for name in ("resnet50", "efficientnet_b5x", "efficientnet_v2_s"):
        with pytest.raises(ValueError, match=f"torchvision://{name}' names no .*efficientnet_bN"):
            resolve_weights(name)
    # What PathManager (iopath) answers for these names, without converting anything.
    assert PathManager.exists("torchvision://efficientnet_b5")
    assert not PathManager.exists("torchvision://resnet50")


def test_each_weights_entry_of_a_variant_has_its_own_converted_file(tmp_path):
    """B1 has two ImageNet weights: each is converted and cached on its own, so naming one never
    loads the other's cached conversion."""
    handler = TorchvisionEfficientNetHandler(cache_dir=str(tmp_path))
    files = {
        handler.converted_file(resolve_weights(f"EfficientNet_B1_Weights.IMAGENET1K_V{v}")[1])
        for v in (1, 2)
    }
    assert len(files) == 2


def test_downloads_check_torchvisions_hash():
    class Weights:
        def get_state_dict(self, **kwargs):
            return kwargs

    assert _download(Weights())["check_hash"] is True


def test_local_torchvision_file_loads_every_trunk_tensor(handler, torchvision_b0, tmp_path, caplog):
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(torchvision_b0, tmp_path / "hub" / "checkpoints" / B0_FILE)
    cfg = tiny_config(["MODEL.WEIGHTS", "torchvision://efficientnet_b0"])
    model = build_model(cfg)
    checkpointer = EfficientPSCheckpointer(model)
    with caplog.at_level(logging.INFO):
        checkpointer.load(cfg.MODEL.WEIGHTS)
    assert handler.download_calls == []  # the local file was used
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    report = checkpointer.last_report
    assert report.loaded == len(trunk) and not report.unexpected and not report.incorrect_shapes
    for name, value in trunk.items():
        torch.testing.assert_close(value, torchvision_b0[name[len("backbone.bottom_up.") :]])
    assert all(not k.startswith("backbone.bottom_up.") for k in report.missing)
    # The conversion reports what it dropped; the checkpointer what stays random.
    se = sum(".fc1." in k or ".fc2." in k for k in torchvision_b0)
    assert f"Skipped {se} squeeze-excitation tensors" in caplog.text
    assert "Skipped 2 classifier tensors" in caplog.text
    assert "sem_seg_head" in caplog.text and "keep their initial (random) values" in caplog.text

    # Converted once, then read from the cache (even with the torchvision file gone).
    cached = PathManager.get_local_path("torchvision://efficientnet_b0")
    assert cached == handler.converted_file(resolve_weights("efficientnet_b0")[1])
    os.remove(tmp_path / "hub" / "checkpoints" / B0_FILE)
    EfficientPSCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)
    assert handler.download_calls == []
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp.pth")]


def test_download_goes_through_the_injected_function(tmp_path, torchvision_b0):
    handler = TorchvisionEfficientNetHandler(
        hub_dir=str(tmp_path / "hub"),
        cache_dir=str(tmp_path / "cache"),
        download=lambda w: {"state_dict": torchvision_b0},
    )
    path = handler._get_local_path("torchvision://EfficientNet_B0_Weights.IMAGENET1K_V1")
    assert torch.load(path, weights_only=True)["model"].keys() >= {
        "backbone.bottom_up.features.0.0.weight"
    }


def test_offline_without_a_local_file_names_the_fix(handler, tmp_path):
    cfg = load_config(
        "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml",
        ["MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", list(range(11, 19))],
    )
    assert cfg.MODEL.WEIGHTS == "torchvision://efficientnet_b0"  # ImageNet by default
    model = build_model(tiny_config())
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        EfficientPSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    message = str(info.value)
    assert len(handler.download_calls) == 1
    assert "https://download.pytorch.org/models/" + B0_FILE in message
    assert str(tmp_path / "hub" / "checkpoints" / B0_FILE) in message  # where to put the file
    assert "convert_torchvision_weights --variant b0" in message and "TORCH_HOME" in message
    with pytest.raises(
        PretrainedWeightsUnavailable, match="convert_torchvision_weights --variant b5"
    ):
        PathManager.get_local_path("torchvision://EfficientNet_B5_Weights.IMAGENET1K_V1")
    assert not os.path.exists(tmp_path / "cache") or not [
        f for f in os.listdir(tmp_path / "cache") if f.endswith(".pth")
    ]


def test_a_wrong_file_in_the_hub_folder_is_named_with_the_fix(handler, tmp_path):
    # The error was the conversion's alone: the state dict does not fit, naming no file.
    local = tmp_path / "hub" / "checkpoints" / B0_FILE
    local.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), local)
    with pytest.raises(ValueError) as info:
        PathManager.get_local_path("torchvision://efficientnet_b0")
    message = str(info.value)
    assert message.startswith("MODEL.WEIGHTS 'torchvision://efficientnet_b0': torchvision's file")
    assert f"'{local}': This is not a torchvision EfficientNet state dict" in message
    assert f"Delete '{local}'" in message and handler.download_calls == []


def test_a_cached_conversion_that_is_a_folder_does_not_blame_the_hub_file(
    handler, tmp_path, torchvision_b0
):
    # The error said "torchvision's file in the hub folder cannot be used ... Delete" it.
    local = tmp_path / "hub" / "checkpoints" / B0_FILE
    local.parent.mkdir(parents=True)
    torch.save(torchvision_b0, local)
    output = handler.converted_file(resolve_weights("efficientnet_b0")[1])
    os.makedirs(output)
    with pytest.raises(ValueError) as info:
        PathManager.get_local_path("torchvision://efficientnet_b0")
    message = str(info.value)
    assert f"The cached conversion '{output}' is a folder" in message
    assert "hub folder" not in message and str(local) not in message
    assert local.exists() and os.listdir(output) == [] and handler.download_calls == []


def test_offline_training_stops_before_the_data_check(handler, tmp_path):
    # The checkpointer met it after the data check (minutes on Cityscapes, whose configs start
    # from torchvision://efficientnet_b5) and after the model and loaders were built.
    from detectron2.engine import default_argument_parser

    from efficientps_d2.engine import startup

    out = tmp_path / "out"
    config = config_file("Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml")
    args = default_argument_parser().parse_args(["--config-file", config, "OUTPUT_DIR", str(out)])
    with pytest.raises(PretrainedWeightsUnavailable, match="'torchvision://efficientnet_b0'"):
        startup.setup(args)
    assert len(handler.download_calls) == 1 and not out.exists()


def test_shipped_configs_start_from_imagenet_except_the_synthetic_one():
    expected = {
        "Cityscapes-PanopticSegmentation/efficientps_b5.yaml": "torchvision://efficientnet_b5",
        "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml": (
            "torchvision://efficientnet_b0"
        ),
        "COCO-PanopticSegmentation/efficientps_b5.yaml": "torchvision://efficientnet_b5",
        "Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml": "",
    }
    for name, weights in expected.items():
        cfg = load_config(name)
        assert cfg.MODEL.WEIGHTS == weights, name
        if weights:
            assert resolve_weights(weights[len("torchvision://") :])[0] == (
                cfg.MODEL.EFFICIENTNET.VARIANT
            ), name
