"""efficientps_d2.model_zoo: configs by name (also from a non-editable install), checkpoints."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from omegaconf import DictConfig

from efficientps_d2 import model_zoo, setup_cfg
from efficientps_d2.checkpoint import CheckpointMismatchError, EfficientPSCheckpointer
from tests.common import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B0 = "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml"
SHIPPED = [
    "COCO-PanopticSegmentation/efficientps_b5.yaml",
    "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml",
    "Cityscapes-PanopticSegmentation/efficientps_b5.yaml",
    "Cityscapes-PanopticSegmentation/efficientps_R_50.yaml",
    "Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml",
    "Synthetic-PanopticSegmentation/efficientps_R_50_quick.yaml",
]


def test_config_files_are_the_top_level_configs():
    names = model_zoo.list_configs()
    assert set(SHIPPED) <= set(names)
    assert not [n for n in names if os.path.basename(n).startswith("Base-")]
    for name in names:
        with open(model_zoo.get_config_file(name)) as a, open(
            os.path.join(REPO, "configs", name)
        ) as b:
            assert a.read() == b.read()
    cfg = model_zoo.get_config(B0)
    assert cfg.MODEL.EFFICIENTNET.VARIANT == "b0" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert model_zoo.get_config_file("configs/" + B0) == model_zoo.get_config_file(B0)
    # Each YAML config's LazyConfig twin is a model zoo name too; the shared parts are not.
    assert {n[: -len(".py")] + ".yaml" for n in names if n.endswith(".py")} == set(SHIPPED)
    assert not [n for n in names if n.startswith("common/")]


def test_lazy_config_names_give_a_lazy_config_and_the_same_model():
    """As Detectron2's model_zoo: a .py name gives LazyConfig.load's config, and get()
    instantiates its model, loading train.init_checkpoint."""
    quick = "Synthetic-PanopticSegmentation/efficientps_b0_quick"
    cfg = model_zoo.get_config(quick + ".py")
    assert isinstance(cfg, DictConfig) and cfg.train.max_iter == 300
    lazy, yaml = (model_zoo.get(quick + ext, device="cpu") for ext in (".py", ".yaml"))
    assert lazy.training and lazy.thing_semantic_ids == yaml.thing_semantic_ids
    shapes = {k: v.shape for k, v in yaml.state_dict().items()}
    assert {k: v.shape for k, v in lazy.state_dict().items()} == shapes
    with pytest.raises(RuntimeError, match="No trained checkpoint.*train.init_checkpoint"):
        model_zoo.get_config(quick + ".py", trained=True)
    for part in ("common/train.py", "Synthetic-PanopticSegmentation/../common/train.py"):
        with pytest.raises(RuntimeError, match="not in efficientps_d2's model zoo"):
            model_zoo.get_config_file(part)
    with pytest.raises(ValueError, match="LazyConfig.*engine.load_config.*YAML twin"):
        setup_cfg(quick + ".py")  # the YAML reader, which a .py name used to meet as bad YAML


@pytest.mark.parametrize("name", ["NoSuch/config.yaml", "../setup.py", "Base-EfficientPS"])
def test_unknown_config_names_list_the_known_ones(name):
    with pytest.raises(RuntimeError, match="not in efficientps_d2's model zoo.*efficientps_b5"):
        model_zoo.get_config_file(name)


def test_trained_without_checkpoint_is_a_clear_error(monkeypatch):
    from efficientps_d2.engine import lazy_config

    with monkeypatch.context() as m:  # answered without loading the config
        m.setattr(lazy_config, "load_config", lambda *a, **k: pytest.fail("config loaded"))
        for ext, key in ((".yaml", "MODEL.WEIGHTS"), (".py", "train.init_checkpoint")):
            with pytest.raises(RuntimeError, match=f"No trained checkpoint.*none.*{key}"):
                model_zoo.get_config(B0.replace(".yaml", ext), trained=True)
    # Detectron2's idiom, cfg.MODEL.WEIGHTS = model_zoo.get_checkpoint_url(name): the same
    # answer (it was an AttributeError), after the name is checked.
    with pytest.raises(RuntimeError, match="No trained checkpoint.*none.*MODEL.WEIGHTS"):
        model_zoo.get_checkpoint_url(B0)
    with pytest.raises(RuntimeError, match="No trained.*train.init_checkpoint"):
        model_zoo.get_checkpoint_url(B0.replace(".yaml", ".py"))
    with pytest.raises(RuntimeError, match="not in efficientps_d2's model zoo"):
        model_zoo.get_checkpoint_url("COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml")


def test_model_weights_local_path_through_detection_checkpointer(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_config())
    DetectionCheckpointer(source, str(tmp_path)).save("tiny")
    torch.manual_seed(1)
    cfg = tiny_config(["MODEL.WEIGHTS", str(tmp_path / "tiny.pth")])
    target = build_model(cfg)
    EfficientPSCheckpointer(target).load(cfg.MODEL.WEIGHTS)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in target.state_dict().items())
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        EfficientPSCheckpointer(target).load(str(tmp_path / "nope.pth"))
    narrower = build_model(tiny_config(["MODEL.TWO_WAY_FPN.OUT_CHANNELS", 24]))
    with pytest.raises(CheckpointMismatchError, match="other shapes"):
        EfficientPSCheckpointer(narrower).load(cfg.MODEL.WEIGHTS)


def test_configs_ship_inside_a_non_editable_install(tmp_path):
    # Build from a copy of the project, so the shared source tree gets no build/ or symlink.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "configs", "*.egg-info")
    shutil.copytree(os.path.join(REPO, "efficientps_d2"), source / "efficientps_d2", ignore=ignore)
    shutil.copytree(os.path.join(REPO, "configs"), source / "configs")
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        pip + ["--target", str(target), str(source)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SHIPPED:
        for shipped in (name, name[: -len(".yaml")] + ".py"):
            path = target / "efficientps_d2" / "model_zoo" / "configs" / shipped
            assert os.path.isfile(path), shipped

    # The B0 config starts from torchvision's ImageNet B0: a local stand-in for the download.
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(
        torchvision.models.efficientnet_b0(weights=None).state_dict(),
        hub / "efficientnet_b0_rwightman-7f5810bc.pth",
    )
    script = textwrap.dedent(f"""
        import efficientps_d2
        from efficientps_d2 import model_zoo
        assert efficientps_d2.__file__.startswith({str(target)!r}), efficientps_d2.__file__
        path = model_zoo.get_config_file({B0!r})
        assert path.startswith({str(target)!r}), path
        model = model_zoo.get({B0!r}, device="cpu")
        print(type(model).__name__, model.backbone.bottom_up.features[0][0].out_channels)
        """)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    env.update(TORCH_HOME=str(tmp_path / "torch"), FVCORE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=str(outside),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["EfficientPS", "32"]  # the B0 stem


def test_missing_config_file_is_named_with_the_model_zoo_names():
    with pytest.raises(
        FileNotFoundError, match="'configs/nope.yaml' does not exist.*efficientps_b5"
    ):
        setup_cfg("configs/nope.yaml")
