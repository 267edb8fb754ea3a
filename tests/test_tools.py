"""The Detectron2-style command-line tools: visualize_data and analyze_model."""

import logging
import os
import re
import shutil

import pytest

from efficientps_d2.tools import analyze_model, visualize_data

from .test_train_net import NARROW_HEADS, QUICK


@pytest.fixture(scope="module")
def synthetic(data_root):
    """Config overrides naming the tiny synthetic data set, registered under names of its own."""
    from efficientps_d2.data.synthetic import register_synthetic

    train, val = register_synthetic(data_root, prefix="tools_synthetic")
    return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]


@pytest.mark.parametrize("source", ["annotation", "dataloader"])
def test_visualize_data_writes_an_image_per_training_image(tmp_path, synthetic, source):
    out = tmp_path / source
    out.mkdir()
    (out / ".1.0123456789ab.tmp.jpg").write_bytes(b"half an image")  # what a killed run left
    argv = ["--config-file", QUICK, "--source", source, "--output-dir", str(out), *synthetic]
    assert visualize_data.main(argv) == 0
    images = sorted(os.listdir(out))
    assert len(images) == 6 and all(f.endswith((".jpg", ".png")) for f in images), images
    assert all(os.path.getsize(out / f) > 1000 for f in images)


def _register_variant(name, records, like):
    """Registers ``records`` as data set ``name`` with the metadata of data set ``like``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    meta = MetadataCatalog.get(like).as_dict()
    MetadataCatalog.get(name).set(**{k: v for k, v in meta.items() if k != "name"})
    return ["DATASETS.TRAIN", f"('{name}',)"]


def test_visualize_data_draws_segments_without_isthing(tmp_path, synthetic):
    # Detectron2's Cityscapes dicts have no "isthing", which its Visualizer needs (KeyError).
    from detectron2.data import DatasetCatalog

    train = synthetic[1].strip("(',)")
    records = [
        dict(
            d,
            segments_info=[
                {k: v for k, v in s.items() if k != "isthing"} for s in d["segments_info"]
            ],
        )
        for d in DatasetCatalog.get(train)[:2]
    ]
    names = _register_variant("tools_no_isthing", records, train)
    out = tmp_path / "out"
    argv = ["--config-file", QUICK, "--source", "annotation", "--output-dir", str(out), *names]
    assert visualize_data.main(argv + ["DATASETS.TEST", "()"]) == 0
    assert len(os.listdir(out)) == 2


def test_visualize_data_keeps_images_of_two_folders_that_share_a_name(tmp_path, synthetic):
    from detectron2.data import DatasetCatalog

    train = synthetic[1].strip("(',)")
    records = []
    for folder, d in zip(("a", "b"), DatasetCatalog.get(train)):
        os.makedirs(tmp_path / folder)
        shutil.copy(d["file_name"], tmp_path / folder / "frame.png")
        records.append(dict(d, file_name=str(tmp_path / folder / "frame.png")))
    records.append(records[0])  # an image listed twice keeps its one name
    names = _register_variant("tools_same_names", records, train)
    out = tmp_path / "out"
    argv = ["--config-file", QUICK, "--source", "annotation", "--output-dir", str(out), *names]
    assert visualize_data.main(argv + ["DATASETS.TEST", "()"]) == 0
    assert sorted(os.listdir(out)) == ["frame.png", "frame_1.png"]


def test_visualize_data_skips_an_unreadable_image_naming_it(tmp_path, synthetic, caplog, request):
    # It stopped with PIL's "OSError: Truncated File Read", which names no file.
    from detectron2.data import DatasetCatalog

    logger = logging.getLogger("detectron2")
    logger.addHandler(caplog.handler)
    request.addfinalizer(lambda: logger.removeHandler(caplog.handler))
    train = synthetic[1].strip("(',)")
    records = DatasetCatalog.get(train)[:2]
    broken = tmp_path / "broken.png"
    with open(records[1]["file_name"], "rb") as f:
        broken.write_bytes(f.read()[:100])
    records = [records[0], dict(records[1], file_name=str(broken))]
    names = _register_variant("tools_unreadable", records, train)
    out = tmp_path / "out"
    argv = ["--config-file", QUICK, "--source", "annotation", "--output-dir", str(out), *names]
    with caplog.at_level(logging.WARNING, logger="detectron2"):
        assert visualize_data.main(argv + ["DATASETS.TEST", "()"]) == 0
    assert len(os.listdir(out)) == 1
    assert f"Skipped '{broken}'" in caplog.text and "Skipped 1 of 2 images" in caplog.text


def test_visualize_data_output_dir_that_is_a_file_is_named(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, message in (  # was "[Errno 17] File exists" / "[Errno 20] ..."
        (a_file, f"The --output-dir '{a_file}' is a file, not a folder."),
        (
            a_file / "pictures",
            f"Cannot make the --output-dir '{a_file / 'pictures'}': '{a_file}' is not a folder.",
        ),
    ):
        argv = ["--config-file", QUICK, "--source", "annotation", "--output-dir", str(out)]
        with pytest.raises(SystemExit) as error:
            visualize_data.main(argv)
        assert str(error.value) == message


def test_visualize_data_show_makes_no_output_folder(tmp_path, synthetic, monkeypatch):
    import cv2

    shown = []
    monkeypatch.setattr(cv2, "imshow", lambda name, image: shown.append(image.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda *a: -1)
    out = tmp_path / "out"  # it was made, and left empty
    argv = ["--config-file", QUICK, "--source", "annotation", "--output-dir", str(out), "--show"]
    assert visualize_data.main(argv + ["--max-images", "2", *synthetic]) == 0
    assert len(shown) == 2 and not out.exists()


def test_analyze_model_prints_parameters_flops_and_activations(synthetic, caplog, request):
    # The tool's setup_logger stops the "detectron2" logger propagating: read it directly.
    logger = logging.getLogger("detectron2")
    logger.addHandler(caplog.handler)
    request.addfinalizer(lambda: logger.removeHandler(caplog.handler))
    tasks = ["--tasks", "parameter", "flop", "activation", "structure"]
    argv = ["--config-file", QUICK, *tasks, "-n", "1", *NARROW_HEADS, *synthetic]
    with caplog.at_level(logging.INFO, logger="detectron2"):
        assert analyze_model.main(argv) == 0
    log = caplog.text
    table = re.search(r"Parameter Count:\n(.*)", log, re.S).group(1)
    assert re.search(r"\| model\s*\|\s*[\d.]+[MK]\s*\|", table)
    assert "backbone.bottom_up" in table and "sem_seg_head" in table
    total = float(re.search(r"Total GFlops: ([\d.]+)±", log).group(1))
    assert 0 < total < 10
    assert "Flops table computed from only one input sample" in log
    assert float(re.search(r"Total \(Million\) Activations: ([\d.]+)±", log).group(1)) > 0
    assert "Model Structure:\nEfficientPS(" in log

    # FLOPs are the architecture's, also where inference runs the fused copy (the default): fvcore
    # does not count its oneDNN kernels.
    caplog.clear()
    plain = ["MODEL.EFFICIENTPS.FAST_INFERENCE", "False"]
    argv = ["--config-file", QUICK, "--tasks", "flop", "-n", "1", *NARROW_HEADS, *synthetic, *plain]
    with caplog.at_level(logging.INFO, logger="detectron2"):
        assert analyze_model.main(argv) == 0
    assert float(re.search(r"Total GFlops: ([\d.]+)±", caplog.text).group(1)) == total


def test_analyze_model_takes_config_overrides_right_after_tasks(synthetic, capsys):
    """'--tasks parameter MODEL.WEIGHTS ""' (the README's order, no -n between): --tasks takes
    several words, and those after the last task are config overrides, not bad tasks."""
    tasks = ["--config-file", QUICK, "--tasks", "parameter"]
    assert analyze_model.main([*tasks, "MODEL.WEIGHTS", "", *NARROW_HEADS, *synthetic]) == 0
    assert analyze_model.main([*tasks, "SEED", "3", *NARROW_HEADS, *synthetic]) == 0  # no dot
    with pytest.raises(
        ValueError, match="MODEL.NO_SUCH_KEY is not a config key"
    ):  # it reached the config
        analyze_model.main([*tasks, "MODEL.NO_SUCH_KEY", "1", *NARROW_HEADS, *synthetic])
    with pytest.raises(SystemExit) as error:
        analyze_model.main([*tasks, "flops"])
    assert error.value.code == 2
    assert "invalid choice: 'flops' (choose from flop, activation" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        analyze_model.main(["--config-file", QUICK, "--tasks", "flop", "-n", "0"])
    assert error.value.code == 2
    assert "-n/--num-inputs: must be at least 1, got 0" in capsys.readouterr().err
