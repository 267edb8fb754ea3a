"""LazyConfig (.py) twins of the shipped YAML configs: same model, trained through train_net.py."""

import glob
import json
import os
import re
import shutil

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from efficientps_d2.config_adapter import ConfigAdapter
from efficientps_d2.data.dataset_mapper import EfficientPSDatasetMapper
from efficientps_d2.data.synthetic import register_synthetic
from efficientps_d2.data.unreadable import UnreadableDataError
from efficientps_d2.engine import load_config, startup
from efficientps_d2.engine.lazy_config import INFERENCE_PARTS, apply_overrides
from efficientps_d2.visualization import IMAGE_NAME

from .fixtures import write_panoptic_dataset
from .test_train_net import REPO, copypaste_results
from .test_train_net import run_to_end as run_yaml_to_end
from .test_train_net import train_net

CONFIGS = os.path.join(REPO, "configs")
YAML_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS)[: -len(".yaml")]
    for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))
)
QUICK_PY = os.path.join(CONFIGS, "Synthetic-PanopticSegmentation", "efficientps_b0_quick.py")
# The quick config with narrower heads and a few tiny steps, so a run takes seconds.
TINY = [
    "model.backbone.out_channels=32",
    "model.sem_seg_head.dpc_channels=16",
    "model.sem_seg_head.convs_dim=16",
    "model.roi_heads.box_head.fc_dims=[32,32]",
    "model.roi_heads.box_predictor.input_shape.channels=32",
    "model.roi_heads.mask_head.conv_dims=[16,16,16,16,16]",
    "model.roi_heads.batch_size_per_image=32",
    "dataloader.train.total_batch_size=2",
    "optimizer.lr=0.01",
    "lr_multiplier.warmup_iters=2",
    "lr_multiplier.steps=[]",
]


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.nn.Module):
        return repr(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def settings(model):
    """Every plain setting held by the model's modules and their helpers (matchers, transforms)."""
    simple = (int, float, str, bool, tuple, list, dict, ListConfig, DictConfig, type(None))
    found = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, simple):
                found[f"{name}.{key}"] = _plain(value)
            elif not isinstance(value, (torch.nn.Module, torch.Tensor)) and hasattr(
                value, "__dict__"
            ):
                for k, v in vars(value).items():
                    if isinstance(v, simple) or (isinstance(v, torch.Tensor) and v.numel() < 10):
                        found[f"{name}.{key}.{k}"] = _plain(v)
    # A float loss weight means {"loss_cls": w, "loss_box_reg": w}; from a YAML config Detectron2
    # passes only the box one (the class loss then defaults to 1.0): the same weights.
    found.pop("roi_heads.box_predictor.loss_weight")
    return found


def test_every_yaml_config_has_a_lazy_twin():
    assert len(YAML_CONFIGS) == 6
    for name in YAML_CONFIGS:
        assert os.path.isfile(os.path.join(CONFIGS, name + ".py")), name


def test_lazy_configs_hold_the_five_parts_and_nothing_else():
    # LazyConfig.load keeps every module-level dict config whose name has no leading "_": a loop
    # variable over model parts became a top-level key, which LazyConfig.save wrote to config.yaml.
    for name in YAML_CONFIGS:
        cfg = load_config(os.path.join(CONFIGS, name + ".py"))
        assert sorted(cfg) == ["dataloader", "lr_multiplier", "model", "optimizer", "train"], name


@pytest.mark.parametrize("name", YAML_CONFIGS)
def test_python_and_yaml_configs_build_the_same_model(name):
    torch.manual_seed(0)
    from_yaml = ConfigAdapter(load_config(os.path.join(CONFIGS, name + ".yaml"))).build_model()
    from_py = ConfigAdapter(load_config(os.path.join(CONFIGS, name + ".py"))).build_model()
    shapes = {k: tuple(v.shape) for k, v in from_yaml.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in from_py.state_dict().items()}
    assert settings(from_yaml) == settings(from_py)


def test_lazy_configs_name_the_same_data_weights_and_schedule():
    for name in YAML_CONFIGS:
        yaml_cfg = load_config(os.path.join(CONFIGS, name + ".yaml"))
        py_cfg = load_config(os.path.join(CONFIGS, name + ".py"))
        a, b = ConfigAdapter(yaml_cfg), ConfigAdapter(py_cfg)
        assert a.train_dataset_names == b.train_dataset_names, name
        assert a.test_dataset_names == b.test_dataset_names, name
        assert a.weights == b.weights, name
        assert (yaml_cfg.SOLVER.MAX_ITER, list(yaml_cfg.SOLVER.STEPS)) == (
            py_cfg.train.max_iter,
            list(py_cfg.lr_multiplier.steps),
        ), name
        assert yaml_cfg.SOLVER.BASE_LR == py_cfg.optimizer.lr, name
        assert yaml_cfg.SOLVER.IMS_PER_BATCH == py_cfg.dataloader.train.total_batch_size, name
        # The training augmentations, with their settings (the crop's padding, ...).
        from_yaml = EfficientPSDatasetMapper.from_config(yaml_cfg, True)["augmentations"]
        from_py = instantiate(py_cfg.dataloader.train.mapper.augmentations)
        assert [(type(t), _plain(vars(t))) for t in from_yaml] == [
            (type(t), _plain(vars(t))) for t in from_py
        ], name
        aug, tta = yaml_cfg.TEST.AUG, py_cfg.train.tta
        assert (aug.ENABLED, list(aug.MIN_SIZES), aug.MAX_SIZE, aug.FLIP) == (
            tta.enabled,
            list(tta.min_sizes),
            tta.max_size,
            tta.flip,
        ), name


@pytest.fixture
def other_metadata():
    """Two registered data sets' metadata, unlike the synthetic one's (things [0, 1, 2])."""
    names = {
        "test_lazy_other_things": {1: 0, 2: 2, 3: 4},
        "test_lazy_four_things": {1: 0, 2: 2, 3: 4, 7: 6},
    }
    for name, things in names.items():
        MetadataCatalog.get(name).set(
            thing_dataset_id_to_contiguous_id=things,
            stuff_dataset_id_to_contiguous_id={4: 1, 5: 3, 6: 5},
        )
    yield list(names)
    for name in names:
        MetadataCatalog.remove(name)


def test_overriding_the_training_data_set_moves_the_thing_ids_along(other_metadata):
    # As MODEL.EFFICIENTPS.THING_SEMANTIC_IDS: [] reads DATASETS.TRAIN's metadata in a YAML
    # config: the model and the training mapper follow dataloader.train.dataset.names.
    cfg = load_config(QUICK_PY, [f"dataloader.train.dataset.names={other_metadata[0]}"])
    assert instantiate(cfg.model).thing_semantic_ids == [0, 2, 4]
    assert instantiate(cfg.dataloader.train.mapper).thing_semantic_ids == [0, 2, 4]
    # The mappers' semantic classes are the model's: one override sets both.
    cfg = load_config(QUICK_PY, ["model.sem_seg_head.num_classes=7"])
    assert instantiate(cfg.dataloader.train.mapper).num_classes == 7
    assert instantiate(cfg.dataloader.test.mapper).num_classes == 7
    assert instantiate(load_config(QUICK_PY).model).thing_semantic_ids == [0, 1, 2]


def test_a_data_set_with_more_things_than_the_roi_heads_stops_naming_the_key(other_metadata):
    cfg = load_config(QUICK_PY, [f"dataloader.train.dataset.names=[{other_metadata[1]}]"])
    with pytest.raises(
        ValueError,
        match=r"4 thing classes, but the ROI heads have 3 .*model\.roi_heads\.num_classes",
    ):
        instantiate(cfg.model)
    cfg = load_config(
        QUICK_PY,
        ["model.roi_heads.num_classes=4", f"dataloader.train.dataset.names=[{other_metadata[1]}]"],
    )
    with pytest.raises(ValueError, match=r"\[0, 6\) .*model\.sem_seg_head\.num_classes"):
        instantiate(cfg.model)


# The README's LazyConfig for one's own data (Data section), on the data set ROOT.
OWN_DATA_CONFIG = """
from detectron2.data import DatasetCatalog

from efficientps_d2 import model_zoo
from efficientps_d2.data import register_panoptic_dataset

for split in ("train", "val"):
    if f"mydata_{{split}}" not in DatasetCatalog.list():
        register_panoptic_dataset(
            f"mydata_{{split}}",
            image_root=f"{root}/images/{{split}}",
            panoptic_root=f"{root}/panoptic_{{split}}",
            panoptic_json=f"{root}/panoptic_{{split}}.json",
        )

_base = model_zoo.get_config("Synthetic-PanopticSegmentation/efficientps_b0_quick.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _base[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
dataloader.train.dataset.names = "mydata_train"
dataloader.test.dataset.names = "mydata_val"
model.roi_heads.num_classes = 2  # thing classes
model.sem_seg_head.num_classes = 4  # stuff and thing classes
"""


def test_own_data_registered_in_a_lazy_config_trains_and_evaluates(tmp_path, data_root):
    """train_net.py on a data set of one's own (2 things, 2 stuff classes, other ids than the
    synthetic data's), registered by the config file itself; the model's thing ids follow it."""
    root = tmp_path / "mydata"
    for split in ("train", "val"):
        write_panoptic_dataset(str(root), split, num_images=4, height=64, width=96)
    config = tmp_path / "my_data.py"
    config.write_text(OWN_DATA_CONFIG.format(root=root))
    out_dir = tmp_path / "run"
    args = [*TINY, "train.max_iter=2", "dataloader.train.total_batch_size=2"]
    log = run_yaml_to_end(
        [*args, f"train.output_dir={out_dir}"], data_root, config_file=str(config)
    )
    results = copypaste_results(log)
    assert {"panoptic_seg", "sem_seg"} <= set(results), log[-3000:]
    assert (out_dir / "model_final.pth").is_file()


def test_lazy_quick_config_trains_and_evaluates_through_train_net(tmp_path, data_root):
    out_dir = str(tmp_path / "run")
    args = [*TINY, "train.max_iter=2", "train.vis_period=1", f"train.output_dir={out_dir}"]
    log = run_lazy_to_end(args, data_root)
    assert {"model_final.pth", "last_checkpoint", "config.yaml"} <= set(os.listdir(out_dir))
    # train.vis_period: the panoptic pictures of VIS_PERIOD, one per iteration, in tensorboard.
    events = EventAccumulator(out_dir, size_guidance={"images": 0})
    events.Reload()
    assert [p.step for p in events.Images(IMAGE_NAME)] == [0, 1]
    trained = copypaste_results(log)
    assert set(trained) == {"panoptic_seg", "sem_seg", "bbox", "segm"}
    assert {"PQ", "SQ", "RQ"} <= set(trained["panoptic_seg"]) and "mIoU" in trained["sem_seg"]

    weights = os.path.join(out_dir, "model_final.pth")
    eval_args = [f"train.init_checkpoint={weights}", f"train.output_dir={tmp_path / 'e'}"]
    # train.tta (TEST.AUG): the same evaluation, then one with test-time augmentation. The run's
    # own config.yaml (LazyConfig.save's YAML of the config and its overrides) is a LazyConfig
    # too: it was read as a YAML config (a yacs AssertionError on its first python tag).
    tta = ["train.tta.enabled=True", "train.tta.min_sizes=[112,128]", "train.tta.max_size=192"]
    saved = os.path.join(out_dir, "config.yaml")
    log = run_yaml_to_end(["--eval-only", *eval_args, *tta], data_root, config_file=saved)
    results = copypaste_results(log)
    assert {k: v for k, v in results.items() if not k.endswith("_TTA")} == trained
    assert set(results) - set(trained) == {f"{task}_TTA" for task in trained}
    assert os.path.isdir(tmp_path / "e" / "inference_TTA")


@pytest.mark.parametrize("kind", [".yaml", ".py"])
def test_expected_results_of_test_time_augmentation_are_checked_after_training(
    tmp_path, data_root, kind
):
    # After training only the plain results were checked: an expected "panoptic_seg_TTA" row
    # failed ("Result verification failed!", exit 1) though --eval-only passed it; and the TTA
    # evaluation ran after the writer, so its results never reached metrics.json.
    from .test_train_net import TINY as YAML_TINY

    out_dir = tmp_path / "run"
    if kind == ".py":
        args = [*TINY, "train.max_iter=1", "train.tta.enabled=True", "train.tta.min_sizes=[96]"]
        args += ["train.expected_results=[[panoptic_seg_TTA,PQ,50,50]]"]
        args += [f"train.output_dir={out_dir}"]
    else:
        args = [*YAML_TINY, "SOLVER.MAX_ITER", "1", "TEST.AUG.ENABLED", "True"]
        args += ["TEST.AUG.MIN_SIZES", "(96,)", "OUTPUT_DIR", str(out_dir)]
        args += ["TEST.EXPECTED_RESULTS", "[['panoptic_seg_TTA','PQ',50,50]]"]
    run_yaml_to_end(args, data_root, config_file=QUICK_PY[: -len(".py")] + kind)
    with open(out_dir / "metrics.json") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    assert "panoptic_seg/PQ" in last and "panoptic_seg_TTA/PQ" in last


def run_lazy_to_end(args, root):
    return run_yaml_to_end(args, root, config_file=QUICK_PY)


def data_with_unreadable_image(tmp_path, data_root):
    """(root, image): a copy of the data whose first training image is truncated."""
    root = tmp_path / "datasets"
    shutil.copytree(os.path.join(data_root, "synthetic_panoptic"), root / "synthetic_panoptic")
    image = sorted((root / "synthetic_panoptic" / "images" / "train").glob("*.jpg"))[0]
    with open(image, "r+b") as f:
        f.truncate(40)  # the header survives, the data does not
    return root, image


def test_lazy_run_skips_an_unreadable_image_and_verifies_the_results(tmp_path, data_root):
    root, image = data_with_unreadable_image(tmp_path, data_root)
    out_dir = tmp_path / "run"
    args = [
        *TINY,
        "train.max_iter=1",
        "dataloader.train.total_batch_size=6",  # the whole training set: the broken image too
        "dataloader.train.max_unreadable_fraction=0.2",
        "train.expected_results=[[sem_seg,mIoU,1000,1]]",  # out of reach
        f"train.output_dir={out_dir}",
    ]
    proc = train_net(args, str(root), config_file=QUICK_PY)
    out, _ = proc.communicate(timeout=600)
    assert "Skipping unreadable training sample (1 so far)" in out and str(image) in out
    assert (out_dir / "model_final.pth").exists()  # trained past it
    # train.expected_results: Detectron2's verify_results after training, as TEST.EXPECTED_RESULTS.
    assert proc.returncode == 1 and "Result verification failed!" in out, out[-3000:]


@pytest.mark.parametrize(
    "kind, overrides, allows",
    [
        (
            ".py",
            lambda name: [
                f"dataloader.train.dataset.names={name}",
                "dataloader.train.total_batch_size=6",
                "dataloader.train.max_unreadable_fraction=0",
            ],
            "dataloader.train.max_unreadable_fraction=0 allows",
        ),
        (  # the tools (visualize_data) read the loader train_net.py trains with, for either kind
            ".yaml",
            lambda name: [
                "DATASETS.TRAIN",
                f"('{name}',)",
                "SOLVER.IMS_PER_BATCH",
                6,
                "DATALOADER.MAX_UNREADABLE_FRACTION",
                0.0,
            ],
            "DATALOADER.MAX_UNREADABLE_FRACTION=0.0 allows",
        ),
    ],
)
def test_train_loader_stops_past_max_unreadable_fraction_naming_the_file(
    tmp_path, data_root, kind, overrides, allows
):
    root, image = data_with_unreadable_image(tmp_path, data_root)
    names = register_synthetic(str(root), prefix=f"test_unreadable_{kind[1:]}")
    try:
        cfg = load_config(QUICK_PY[: -len(".py")] + kind, overrides(names[0]))
        with pytest.raises(UnreadableDataError) as e:
            next(iter(ConfigAdapter(cfg).build_train_loader()))
        assert "1 of the 6 training samples cannot be read" in str(e.value)
        assert allows in str(e.value)
        assert str(image) in str(e.value)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_lazy_expected_results_are_verified_as_test_expected_results():
    results = {"panoptic_seg": {"PQ": 60.0}}
    for cfg in (
        load_config(QUICK_PY, ["train.expected_results=[[panoptic_seg,PQ,60.3,0.5]]"]),
        load_config(
            QUICK_PY[: -len(".py")] + ".yaml",
            ["TEST.EXPECTED_RESULTS", "[['panoptic_seg', 'PQ', 60.3, 0.5]]"],
        ),
    ):
        assert startup.verify_results(cfg, results)
        with pytest.raises(SystemExit):
            startup.verify_results(cfg, {"panoptic_seg": {"PQ": 59.0}})
    assert startup.verify_results(load_config(QUICK_PY), {})  # none expected: nothing checked


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_iterr=3", r"train has no key 'max_iterr'\. Did you mean 'max_iter'\?"),
        ("trian.max_iter=3", r"the config has no key 'trian'\. Did you mean 'train'\?"),
        (  # an argument that the LazyCall's target does not take either
            "dataloader.test.mapper.augmentations.0.short_edge_lenght=64",
            r"augmentations\.0 has no key 'short_edge_lenght' and its LazyCall's target takes "
            r"no such argument\. Did you mean 'short_edge_length'\?",
        ),
        ("train.max_iter.x=1", r"train\.max_iter is the value 300, which has no 'x'"),
        ("train.max_iter=abc", r"train\.max_iter is 300 \(int\) in the config; .* 'abc' \(str\)"),
        # range() refused it after the model was built: "'float' object cannot be interpreted"
        ("train.max_iter=2.5", r"train\.max_iter is 300 \(int\) in the config; .* 2\.5 \(float\)"),
        ("optimizer.lr=fast", r"optimizer\.lr is 0\.03 \(float\)"),
        ("train.amp.enabled=yes", r"train\.amp\.enabled is False \(bool\)"),
        ("train.amp=False", r"train\.amp is a group of settings \(enabled, precision\)"),
    ],
)
def test_a_misspelled_or_mistyped_override_is_refused_naming_key_and_file(override, message):
    # As yacs refuses an unknown YAML key or a value of another type; Detectron2's LazyConfig
    # would add the key silently (train.max_iterr=3 trained the config's 300 iterations).
    with pytest.raises(ValueError, match=message) as e:
        load_config(QUICK_PY, [override])
    assert f"Refused override '{override}' of {QUICK_PY}" in str(e.value)


def test_overrides_that_add_what_a_config_may_leave_out_are_accepted():
    cfg = load_config(
        QUICK_PY,
        [
            "+train.my_note=1",  # Hydra's "+": a new key, unchecked
            "dataloader.test.batch_size=1",  # an argument its LazyCall leaves at its default
            "dataloader.train.dataset.names=[synthetic_panoptic_train]",  # a name or a list
            "train.max_iter=3.0",  # a whole number, made an int (as 1e4 would be)
            "dataloader.train.total_batch_size=2",
            # StandardROIHeads takes it through **kwargs, for its base class ROIHeads
            "model.roi_heads.proposal_append_gt=False",
        ],
    )
    assert (cfg.train.my_note, cfg.dataloader.test.batch_size) == (1, 1)
    assert cfg.train.max_iter == 3 and isinstance(cfg.train.max_iter, int)
    max_iter = load_config(QUICK_PY, ["train.max_iter=1e4"]).train.max_iter
    assert max_iter == 10000 and type(max_iter) is int
    assert load_config(QUICK_PY, ["optimizer.lr=1"]).optimizer.lr == 1  # an int for a float
    assert cfg.model.roi_heads.proposal_append_gt is False
    with pytest.raises(ValueError, match="Did you mean 'proposal_append_gt'"):
        load_config(QUICK_PY, ["model.roi_heads.proposal_append_gtt=False"])
    del cfg.train["check_pngs"]  # read with a default, so an override may set it where absent
    apply_overrides(cfg, ["train.check_pngs=False"], "x.py")
    assert cfg.train.check_pngs is False


def test_demo_and_export_name_the_lazy_weights_key(tmp_path, capsys):
    # Their checkpoint messages named MODEL.WEIGHTS for a .py config too.
    import demo
    from efficientps_d2.tools import export

    missing = tmp_path / "none.pth"
    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64)).save(image)
    override = [*TINY, f"train.init_checkpoint={missing}"]
    assert demo.main(["--config-file", QUICK_PY, "--input", str(image)]
                     + ["--output", str(tmp_path / "out"), "--opts", *override]) == 1  # fmt: skip
    expected = f"Checkpoint '{missing}' (train.init_checkpoint) does not exist."
    assert expected in capsys.readouterr().err
    args = ["--config-file", QUICK_PY, "--format", "torchscript", "--output", str(tmp_path / "ex")]
    assert export.main(args + override) == 1
    assert expected in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.png"]  # nothing written


@pytest.mark.parametrize("value", ["null", "ResizeShortestEdge", "128"])
def test_test_augmentations_that_are_not_a_list_of_augmentations_are_refused(value):
    # Detectron2's AugmentationList raised "TypeError: 'NoneType' object is not iterable" or
    # "AssertionError: R" from deep in demo.py, the export and the test loader.
    cfg = load_config(QUICK_PY, [f"dataloader.test.mapper.augmentations={value}"])
    message = r"must be a list of Detectron2 Augmentation or Transform objects .*, got "
    with pytest.raises(ValueError, match="^dataloader.test.mapper.augmentations " + message):
        ConfigAdapter(cfg).build_test_augmentations()  # demo.py, the export
    with pytest.raises(ValueError, match=r"\(dataloader.test.mapper.augmentations\) " + message):
        instantiate(cfg.dataloader.test.mapper)  # train_net.py's test loader
    cfg = load_config(QUICK_PY, ["dataloader.test.mapper.augmentations=[]"])
    assert ConfigAdapter(cfg).build_test_augmentations() == []  # none: no resizing


# The quick config without some of its parts.
PARTIAL_CONFIG = """
from efficientps_d2 import model_zoo

_base = model_zoo.get_config("Synthetic-PanopticSegmentation/efficientps_b0_quick.py")
{names} = (_base[k] for k in {parts!r})
"""


@pytest.mark.parametrize("left_out", ["model", "dataloader", "train"])
def test_a_lazy_config_without_a_part_is_refused_naming_the_file(tmp_path, capsys, left_out):
    # They failed inside Detectron2's default_setup (an InterpolationKeyError) after writing
    # log.txt, or after building the model (train.ddp), or ran demo.py on the GPU default.
    from detectron2.engine import default_argument_parser

    import demo
    from efficientps_d2.tools import export

    parts = ("model", "dataloader", "optimizer", "lr_multiplier", "train")
    config = tmp_path / "partial.py"
    kept = tuple(p for p in parts if p != left_out)
    config.write_text(PARTIAL_CONFIG.format(names=", ".join(kept), parts=kept))
    missing = "dataloader.train" if left_out == "dataloader" else left_out
    message = f"{config} defines no {missing}: EfficientPS reads a LazyConfig of Detectron2's"
    out = tmp_path / "out"
    args = default_argument_parser().parse_args(["--config-file", str(config)])
    args.opts = [f"train.output_dir={out}"] if left_out != "train" else []
    with pytest.raises(ValueError, match=re.escape(message)):
        startup.setup(args)
    assert not out.exists()
    message = message.replace("dataloader.train", "dataloader.test")
    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64)).save(image)
    assert (
        demo.main(["--config-file", str(config), "--input", str(image), "--output", str(out)]) == 1
    )
    assert message in capsys.readouterr().err
    args = ["--config-file", str(config), "--format", "onnx", "--output", str(out)]
    assert export.main(args) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("override", ["~model", "model=null", "dataloader.test=null"])
def test_a_part_an_override_removes_is_refused_as_missing(override):
    # It passed the layout check as a None node and failed later, inside whatever read it.
    part = override.lstrip("~").split("=")[0]
    with pytest.raises(ValueError, match=f"{re.escape(QUICK_PY)} defines no {part}:"):
        load_config(QUICK_PY, [override], INFERENCE_PARTS)


def test_the_predictor_warns_that_empty_weights_predict_with_random_ones():
    # demo.py drew an untrained model's output without a word (the export tool warns).
    import logging

    from efficientps_d2.demo import EfficientPSPredictor

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("efficientps_d2.demo.predictor")
    logger.addHandler(handler)
    try:
        EfficientPSPredictor(load_config(QUICK_PY, TINY))
        yaml = QUICK_PY[: -len(".py")] + ".yaml"
        EfficientPSPredictor(load_config(yaml, ["MODEL.TWO_WAY_FPN.OUT_CHANNELS", 32]))
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert messages == [
        "train.init_checkpoint is empty: predicting with random weights. Name the trained ones, "
        "e.g. train.init_checkpoint=model_final.pth.",
        "MODEL.WEIGHTS is empty: predicting with random weights. Name the trained ones, e.g. "
        "MODEL.WEIGHTS model_final.pth.",
    ]


@pytest.mark.parametrize(
    "kind, overrides", [(".py", ["train.max_iter=3"]), (".yaml", ["SOLVER.MAX_ITER", "3"])]
)
def test_misplaced_options_and_missing_files_are_named_for_either_kind(kind, overrides):
    # A flag after the overrides met Hydra's "LexerNoViableAltException: --resume" or yacs's
    # "Override list has odd length"; a mistyped .py path was called "not in the model zoo".
    config_file = QUICK_PY[: -len(".py")] + kind
    with pytest.raises(ValueError, match=f"Found --resume among the config overrides of .*{kind}"):
        load_config(config_file, [*overrides, "--resume"])
    typo = config_file.replace("quick", "quik")
    with pytest.raises(FileNotFoundError, match=f"Config file '{typo}' does not exist, and it is"):
        load_config(typo)
    if kind == ".py":  # YAML's KEY VALUE pairs given to a LazyConfig
        with pytest.raises(ValueError, match="'train.max_iter' .* has no '=': a LazyConfig takes"):
            load_config(config_file, ["train.max_iter", "3"])


def test_a_lazy_call_can_be_overridden_by_a_value_as_its_yaml_key():
    # As MODEL.EFFICIENTPS.THING_SEMANTIC_IDS [3, 4, 5]; Detectron2's merging update refused it
    # ("Cannot merge DictConfig with ListConfig").
    cfg = load_config(QUICK_PY, ["model.thing_semantic_ids=[3,4,5]"])
    assert instantiate(cfg.model).thing_semantic_ids == [3, 4, 5]
