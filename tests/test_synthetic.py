"""The built-in synthetic panoptic data: determinism, structure, atomic generation, registration."""

import filecmp
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_utils

from efficientps_d2.atomic_io import temporary_path
from efficientps_d2.data import synthetic
from efficientps_d2.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    ensure_synthetic_panoptic,
    generate_synthetic_panoptic,
    register_synthetic,
)

SMALL = {"num_train": 16, "num_val": 4, "size": (64, 96), "seed": 0}
TINY = {"num_train": 3, "num_val": 2, "size": (40, 56), "seed": 1}
CATEGORIES = {c["id"]: c for c in SYNTHETIC_CATEGORIES}

# pycocotools' decode with numpy 2: a deprecation inside pycocotools, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _ids(png_path):
    rgb = np.asarray(Image.open(png_path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _load(data_dir, prefix, split):
    with open(os.path.join(data_dir, f"{prefix}_{split}.json")) as f:
        return json.load(f)


def _all_files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def _tmp_dirs(root):
    return [n for n in os.listdir(root) if n.startswith(f".{synthetic.DIRNAME}.")]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_small")
    return ensure_synthetic_panoptic(str(root), **SMALL)


@pytest.fixture
def registered():
    """Names registered by a test, removed from Detectron2's catalogs afterwards."""
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, small_set):
    again = ensure_synthetic_panoptic(str(tmp_path / "again"), **SMALL)
    files = _all_files(small_set)
    assert files == _all_files(again)
    match, mismatch, errors = filecmp.cmpfiles(small_set, again, files, shallow=False)
    assert not mismatch and not errors

    other = ensure_synthetic_panoptic(str(tmp_path / "other"), **dict(SMALL, seed=1))
    for name in ("panoptic_train.json", "instances_val.json"):
        assert not filecmp.cmp(os.path.join(small_set, name), os.path.join(other, name), False)
    png = os.path.join("panoptic_train", "train_000001.png")
    assert not np.array_equal(_ids(os.path.join(small_set, png)), _ids(os.path.join(other, png)))


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_pngs_match_segments_info(small_set, split):
    panoptic = _load(small_set, "panoptic", split)
    assert panoptic["categories"] == SYNTHETIC_CATEGORIES
    assert len(panoptic["images"]) == len(panoptic["annotations"]) == SMALL[f"num_{split}"]
    height, width = SMALL["size"]
    images = {im["id"]: im for im in panoptic["images"]}
    for ann in panoptic["annotations"]:
        image = images[ann["image_id"]]
        assert (image["height"], image["width"]) == (height, width)
        stem = os.path.splitext(ann["file_name"])[0]
        assert image["file_name"] == stem + ".jpg"
        rgb = Image.open(os.path.join(small_set, "images", split, image["file_name"]))
        assert rgb.mode == "RGB" and rgb.size == (width, height)

        ids = _ids(os.path.join(small_set, f"panoptic_{split}", ann["file_name"]))
        assert ids.shape == (height, width)
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert len(segments) == len(ann["segments_info"]), "duplicate segment ids"
        # The data has no void: every pixel belongs to a listed segment, and vice versa.
        assert set(np.unique(ids).tolist()) == set(segments)
        for seg_id, seg in segments.items():
            assert seg["category_id"] in CATEGORIES and seg["iscrowd"] == 0
            rows, cols = np.nonzero(ids == seg_id)
            assert seg["area"] == len(rows)
            x, y = int(cols.min()), int(rows.min())
            assert seg["bbox"] == [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]
        # COCO's convention: one segment per stuff class.
        stuff = [
            s["category_id"]
            for s in segments.values()
            if not CATEGORIES[s["category_id"]]["isthing"]
        ]
        assert len(stuff) == len(set(stuff))
        things = [s for s in segments.values() if CATEGORIES[s["category_id"]]["isthing"]]
        assert len(things) <= 8


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_json_matches_panoptic(small_set, split):
    panoptic = _load(small_set, "panoptic", split)
    instances = _load(small_set, "instances", split)
    assert instances["images"] == panoptic["images"]
    assert instances["categories"] == [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len({a["id"] for a in instances["annotations"]}) == len(instances["annotations"])
    for pan in panoptic["annotations"]:
        ids = _ids(os.path.join(small_set, f"panoptic_{split}", pan["file_name"]))
        things = [s for s in pan["segments_info"] if CATEGORIES[s["category_id"]]["isthing"]]
        annotations = by_image.get(pan["image_id"], [])
        assert len(annotations) == len(things)
        for seg, ann in zip(things, annotations):
            assert ann["category_id"] == seg["category_id"] and ann["iscrowd"] == 0
            assert ann["area"] == seg["area"] and ann["bbox"] == seg["bbox"]
            mask = mask_utils.decode(ann["segmentation"])
            np.testing.assert_array_equal(mask.astype(bool), ids == seg["id"])


def test_classes_and_hard_cases_are_present(small_set):
    stuff, things, touching_pair = set(), set(), False
    for split in ("train", "val"):
        for ann in _load(small_set, "panoptic", split)["annotations"]:
            ids = _ids(os.path.join(small_set, f"panoptic_{split}", ann["file_name"]))
            category = {s["id"]: s["category_id"] for s in ann["segments_info"]}
            for c in category.values():
                (things if CATEGORIES[c]["isthing"] else stuff).add(c)
            # Two different segments of the same thing class sharing a pixel edge.
            for a, b in ((ids[:-1], ids[1:]), (ids[:, :-1], ids[:, 1:])):
                edge = a != b
                for x, y in set(zip(a[edge].tolist(), b[edge].tolist())):
                    if category[x] == category[y] and CATEGORIES[category[x]]["isthing"]:
                        touching_pair = True
    assert stuff == {c["id"] for c in SYNTHETIC_CATEGORIES if not c["isthing"]}
    assert things == {c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]}
    assert len(stuff) >= 3 and len(things) >= 3
    assert touching_pair


def test_categories_are_coco_like():
    ids = [c["id"] for c in SYNTHETIC_CATEGORIES]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    assert sum(c["isthing"] for c in SYNTHETIC_CATEGORIES) >= 3
    assert sum(not c["isthing"] for c in SYNTHETIC_CATEGORIES) >= 3
    for c in SYNTHETIC_CATEGORIES:
        assert c["name"] and len(c["color"]) == 3


def test_leftover_temp_folder_of_a_killed_run_is_removed(tmp_path):
    # What atomic_directory leaves when its process is killed mid-generation.
    leftover = Path(temporary_path(str(tmp_path / synthetic.DIRNAME))) / synthetic.DIRNAME
    leftover.mkdir(parents=True)
    (leftover / "panoptic_train.json").write_text("{ half written")
    foreign = tmp_path / f".{synthetic.DIRNAME}.backup"  # not a temporary name: left alone
    foreign.mkdir()
    data_dir = ensure_synthetic_panoptic(str(tmp_path), **TINY)
    assert data_dir == str(tmp_path / synthetic.DIRNAME)
    assert len(_load(data_dir, "panoptic", "train")["annotations"]) == TINY["num_train"]
    assert _tmp_dirs(tmp_path) == [foreign.name]


def test_failure_midway_leaves_no_data_set(tmp_path, monkeypatch):
    real_render, calls = synthetic.render_sample, []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_sample", failing_render)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ensure_synthetic_panoptic(str(tmp_path), **TINY)
    assert not (tmp_path / synthetic.DIRNAME).exists()
    assert _tmp_dirs(tmp_path) == []

    monkeypatch.setattr(synthetic, "render_sample", real_render)
    data_dir = ensure_synthetic_panoptic(str(tmp_path), **TINY)
    assert len(_load(data_dir, "panoptic", "val")["annotations"]) == TINY["num_val"]


def test_incomplete_existing_folder_is_reported(tmp_path):
    (tmp_path / synthetic.DIRNAME / "images").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="not a complete synthetic data set"):
        ensure_synthetic_panoptic(str(tmp_path), **TINY)


def test_concurrent_generation(tmp_path):
    errors = []

    def run():
        try:
            ensure_synthetic_panoptic(str(tmp_path), **TINY)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert synthetic._is_complete(str(tmp_path / synthetic.DIRNAME))
    assert _tmp_dirs(tmp_path) == []


def test_lost_rename_race_is_tolerated(tmp_path, monkeypatch):
    # Without a lock (e.g. no flock), another process may finish first: its data is kept.
    monkeypatch.setattr(synthetic, "_generation_lock", lambda root: _NoLock())
    real_generate = synthetic.generate_synthetic_panoptic
    final = str(tmp_path / synthetic.DIRNAME)

    def generate_and_lose(out_dir, **kwargs):
        real_generate(out_dir, **kwargs)
        real_generate(final, **kwargs)  # the other process wins the rename

    monkeypatch.setattr(synthetic, "generate_synthetic_panoptic", generate_and_lose)
    assert ensure_synthetic_panoptic(str(tmp_path), **TINY) == final
    assert synthetic._is_complete(final) and _tmp_dirs(tmp_path) == []


class _NoLock:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        ensure_synthetic_panoptic(str(tmp_path), **dict(TINY, num_val=0))
    with pytest.raises(ValueError, match="size"):
        generate_synthetic_panoptic(str(tmp_path / "x"), **dict(TINY, size=(16, 16)))


def test_command(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "40", "48"]
    data_dir = synthetic.main(args + ["--seed", "3"])
    panoptic = _load(data_dir, "panoptic", "train")
    assert len(panoptic["annotations"]) == 2
    assert (panoptic["images"][0]["height"], panoptic["images"][0]["width"]) == (40, 48)
    synthetic.main(args)
    assert "already exists" in capsys.readouterr().out
    before = _load(data_dir, "panoptic", "train")
    synthetic.main(args + ["--overwrite"])  # seed 0 now: different data in place
    assert _load(data_dir, "panoptic", "train") != before
    assert _tmp_dirs(tmp_path) == []


def test_command_line_tool(tmp_path):
    """The README's command, run as a user runs it; `python -m efficientps_d2.data.synthetic`
    printed runpy's RuntimeWarning (the package had imported the module) on every run."""
    proc = subprocess.run(
        [sys.executable, "-m", "efficientps_d2.tools.generate_synthetic_data"]
        + ["--root", str(tmp_path), "--num-train", "1", "--num-val", "1", "--size", "32", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]
    assert synthetic._is_complete(str(tmp_path / synthetic.DIRNAME))


def test_builtin_names_are_registered():
    for split in ("train", "val"):
        name = f"synthetic_panoptic_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco_panoptic_seg"
        assert meta.json_file.endswith(f"instances_{split}.json")


def test_registration_generates_lazily(tmp_path, monkeypatch, registered):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    registered += register_synthetic(prefix="test_synthetic_lazy", **TINY)
    data_dir = tmp_path / synthetic.DIRNAME
    assert not data_dir.exists(), "registration alone must not generate"

    meta = MetadataCatalog.get("test_synthetic_lazy_val")
    assert meta.panoptic_json == str(data_dir / "panoptic_val.json")
    assert meta.json_file == str(data_dir / "instances_val.json")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert len(meta.stuff_classes) == len(SYNTHETIC_CATEGORIES)
    assert len(meta.thing_dataset_id_to_contiguous_id) == 3

    dicts = DatasetCatalog.get("test_synthetic_lazy_train")
    assert data_dir.is_dir() and len(dicts) == TINY["num_train"]
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and os.path.isfile(d["pan_seg_file_name"])
        assert (d["height"], d["width"]) == TINY["size"]
        for seg in d["segments_info"]:
            dataset_id = (
                meta.thing_dataset_id_to_contiguous_id
                if seg["isthing"]
                else meta.stuff_dataset_id_to_contiguous_id
            )
            assert seg["category_id"] in dataset_id.values()
    assert len(DatasetCatalog.get("test_synthetic_lazy_val")) == TINY["num_val"]


def test_registration_with_explicit_root_uses_existing_data(tmp_path, registered):
    data_dir = ensure_synthetic_panoptic(str(tmp_path), **TINY)
    stamp = os.path.getmtime(os.path.join(data_dir, "panoptic_train.json"))
    # Other arguments than the data on disk: the existing data set is used as it is.
    registered += register_synthetic(str(tmp_path), prefix="test_synthetic_root", num_train=7)
    assert len(DatasetCatalog.get("test_synthetic_root_train")) == TINY["num_train"]
    assert os.path.getmtime(os.path.join(data_dir, "panoptic_train.json")) == stamp
