"""Fault corpus for efficientps_d2.data.check: each fault is refused with its file, id or key."""

import itertools
import json
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import launch
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.data.check import (
    DataCheckError,
    _image_header,
    check_class_counts,
    check_dataset,
    check_dataset_names,
    check_evaluator_types,
    main,
    validate_datasets,
)
from efficientps_d2.engine import load_config as load_lazy_config
from tests.common import load_config
from tests.fixtures import CUSTOM_CATEGORIES, edit_json, write_panoptic_dataset
from tests.test_lazy_config import QUICK_PY

_counter = itertools.count()


@pytest.fixture
def dataset(tmp_path):
    """A valid custom data set (4 classes, 2 things), registered under a fresh name."""
    files = write_panoptic_dataset(str(tmp_path), num_images=2)
    name = f"test_data_check_{next(_counter)}"
    files["name"] = name

    def register():
        register_panoptic_dataset(
            name, **{k: files[k] for k in ("image_root", "panoptic_root", "panoptic_json")}
        )

    files["register"] = register
    yield files
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _config(name, num_classes=4, num_things=2, test=()):
    cfg = load_config(
        opts=[
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes,
            "MODEL.ROI_HEADS.NUM_CLASSES", num_things,
        ]
    )  # fmt: skip
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = tuple(test)
    return cfg


def test_valid_dataset_passes_with_class_counts(dataset):
    dataset["register"]()
    (report,) = validate_datasets(_config(dataset["name"]))
    assert report.errors == [] and report.pngs_checked == 2 and report.num_images == 2
    # Per image: cat x2, dog x2 (one crowd), grass, sky; things first in contiguous order.
    assert report.class_counts == {0: 4, 1: 4, 2: 2, 3: 2}
    assert "grass" in report.format()


def test_rgba_panoptic_pngs_pass_and_are_read_by_their_rgb(dataset):
    # Training, evaluation and panopticapi read the ids from R, G, B and ignore the alpha.
    first, second = (r["pan_seg_file_name"] for r in dataset["records"])
    rgba = np.asarray(Image.open(first).convert("RGBA")).copy()
    rgba[..., 3] = 7
    Image.fromarray(rgba, mode="RGBA").save(first)
    rgba = np.asarray(Image.open(second).convert("RGBA")).copy()
    rgba[0, 0, :3] = (1, 2, 3)  # an id that segments_info does not list
    Image.fromarray(rgba, mode="RGBA").save(second)
    dataset["register"]()
    report = check_dataset(dataset["name"])
    assert report.pngs_checked == 2
    assert report.errors == [
        f"Panoptic PNG '{second}' has segment ids [{1 + 256 * 2 + 256**2 * 3}] that its "
        "segments_info does not list (panopticapi refuses such PNGs)."
    ]


def _grayscale(dataset):
    png = dataset["records"][0]["pan_seg_file_name"]
    Image.open(png).convert("L").save(png)
    return png, "mode L"


def _wrong_size(dataset):
    png = dataset["records"][1]["pan_seg_file_name"]
    Image.open(png).resize((20, 10), Image.NEAREST).save(png)
    return png, "20x10"


def _wrong_image_size(dataset):
    # The PNG fits the json's width and height; the image does not. Detectron2's check_image_size
    # stopped training at the first batch that drew it.
    image = dataset["records"][1]["file_name"]
    Image.open(image).resize((18, 12)).save(image)
    return image, "is 18x12 (WxH) but its record says 36x24"


def _float_image(dataset):
    # Training reads such an image only to refuse it (no set range to scale to 8 bits): the
    # check says so before training, from the header.
    image = dataset["records"][0]["file_name"]
    gray = np.asarray(Image.open(image).convert("L"), dtype=np.float32)
    Image.fromarray(gray, mode="F").save(image, format="TIFF")
    return image, "floating-point image"


def _unlisted_id(dataset):
    edit_json(dataset["panoptic_json"], lambda d: d["annotations"][0]["segments_info"].pop())
    return dataset["records"][0]["pan_seg_file_name"], "does not list"


def _absent_id(dataset):
    def edit(data):
        data["annotations"][1]["segments_info"].append({"id": 4242, "category_id": 10})

    edit_json(dataset["panoptic_json"], edit)
    return dataset["records"][1]["pan_seg_file_name"], "4242"


def _no_segments(dataset):
    def edit(data):
        for ann in data["annotations"]:
            ann["segments_info"] = []

    edit_json(dataset["panoptic_json"], edit)
    # Also make the PNGs void, so the only fault is the empty data set.
    for record in dataset["records"]:
        png = record["pan_seg_file_name"]
        Image.fromarray(np.zeros_like(np.asarray(Image.open(png)))).save(png)
    return dataset["panoptic_json"], "no segments at all"


def _truncated_png(dataset):
    png = dataset["records"][0]["pan_seg_file_name"]
    with open(png, "rb") as f:
        data = f.read()
    with open(png, "wb") as f:
        f.write(data[: len(data) // 2])
    return png, "cannot be read"


@pytest.mark.parametrize(
    "fault",
    [_grayscale, _wrong_size, _wrong_image_size, _unlisted_id, _absent_id, _no_segments]
    + [_float_image, _truncated_png],
)
def test_faulty_dataset_refused_naming_the_file(dataset, fault):
    culprit, words = fault(dataset)
    dataset["register"]()
    with pytest.raises(DataCheckError) as e:
        validate_datasets(_config(dataset["name"]))
    assert culprit in str(e.value) and words in str(e.value)


def _with_chunk_before_end(png, kind, data):
    """``png`` with a chunk added after its pixel data (before IEND), as some writers place it."""
    with open(png, "rb") as f:
        content = f.read()
    chunk = struct.pack(">I", len(data)) + kind + data
    chunk += struct.pack(">I", zlib.crc32(kind + data))
    end = content.rindex(b"IEND") - 4
    with open(png, "wb") as f:
        f.write(content[:end] + chunk + content[end:])


def test_image_sizes_come_from_headers_with_the_exif_orientation(tmp_path, monkeypatch):
    """The data check reads every image's size as Detectron2's read_image sees it (EXIF
    orientation 6 swaps width and height) without decoding a PNG that holds no EXIF: Pillow's
    getexif decoded every one (20 ms each for 2048x1024)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees: read as 24x36
    pixels = Image.fromarray(np.zeros((24, 36, 3), np.uint8))
    files = {name: str(tmp_path / name) for name in ("plain.png", "exif.png", "late.png")}
    pixels.save(files["plain.png"])
    pixels.save(files["exif.png"], exif=exif)  # an eXIf chunk before the pixel data
    pixels.save(files["late.png"])
    _with_chunk_before_end(files["late.png"], b"eXIf", exif.tobytes())
    files["late_xmp.png"] = str(tmp_path / "late_xmp.png")  # XMP text, read by getexif too
    pixels.save(files["late_xmp.png"])
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    _with_chunk_before_end(files["late_xmp.png"], b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)
    files["exif.jpg"] = str(tmp_path / "exif.jpg")
    pixels.save(files["exif.jpg"], exif=exif)

    expected = {name: read_image(path).shape[1::-1] for name, path in files.items()}
    assert expected == {"plain.png": (36, 24), "exif.png": (24, 36), "late.png": (24, 36)} | {
        "late_xmp.png": (24, 36),
        "exif.jpg": (24, 36),
    }
    decoded = []
    load = PngImageFile.load

    def counting_load(self):
        decoded.append(os.path.basename(self.filename))
        return load(self)

    monkeypatch.setattr(PngImageFile, "load", counting_load)
    assert {name: _image_header(path)[0] for name, path in files.items()} == expected
    # Only PNGs whose EXIF follows their pixels are decoded (Pillow reads such chunks then).
    assert decoded == ["late.png", "late_xmp.png"]


def test_every_exif_orientation_that_swaps_width_and_height_is_applied(tmp_path):
    """Orientations 5-8 (transposed, rotated by 90 or 270 degrees) swap width and height, 1-4 do
    not: the header's size is the one Detectron2's read_image gives."""
    pixels = Image.fromarray(np.zeros((24, 36, 3), np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = str(tmp_path / f"{orientation}.jpg")
        pixels.save(path, exif=exif)
        assert _image_header(path)[0] == read_image(path).shape[1::-1], orientation


def test_json_only_check_skips_pngs(dataset):
    _grayscale(dataset)
    dataset["register"]()
    cfg = _config(dataset["name"])
    cfg.DATASETS.CHECK_PNGS = False
    (report,) = validate_datasets(cfg)
    assert report.pngs_checked == 0 and report.errors == []


@pytest.mark.parametrize(
    "key, value",
    [("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3), ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5)]
    + [("MODEL.ROI_HEADS.NUM_CLASSES", 1), ("MODEL.ROI_HEADS.NUM_CLASSES", 3)],
)
def test_class_count_mismatch_refused_both_ways(dataset, key, value):
    dataset["register"]()
    cfg = _config(dataset["name"])
    cfg.merge_from_list([key, value])
    with pytest.raises(DataCheckError, match=f"{key} is {value} but data set '{dataset['name']}'"):
        validate_datasets(cfg)


def test_thing_semantic_ids_that_are_not_the_data_sets_things_are_refused(dataset):
    # The counts fit, the ids do not (cat and dog are classes 0 and 1): the mapper refused the
    # first thing segment after training had started, as "out of range for the metadata".
    dataset["register"]()
    cfg = _config(dataset["name"])
    cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = [2, 3]
    with pytest.raises(DataCheckError) as e:
        validate_datasets(cfg)
    assert str(e.value) == (
        f"MODEL.EFFICIENTPS.THING_SEMANTIC_IDS is [2, 3] but the thing classes of data set "
        f"'{dataset['name']}' are [0, 1]; set MODEL.EFFICIENTPS.THING_SEMANTIC_IDS [0,1] (or [], "
        "to read them from the data set)."
    )
    cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = [1, 0]  # another order of the same classes
    validate_datasets(cfg)


def test_thing_semantic_ids_must_fit_the_class_counts(dataset):
    dataset["register"]()
    cfg = _config(dataset["name"])
    for ids in ([0], [0, 1, 2], [0, 4]):
        cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = ids
        with pytest.raises(DataCheckError) as e:
            check_class_counts(cfg)
        assert str(e.value) == (
            f"MODEL.EFFICIENTPS.THING_SEMANTIC_IDS {ids} must have MODEL.ROI_HEADS.NUM_CLASSES=2 "
            "entries in [0, MODEL.SEM_SEG_HEAD.NUM_CLASSES=4)."
        )


def _a_thing_called_stuff(records):
    next(s for s in records[1]["segments_info"] if s["isthing"])["isthing"] = False


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda records: records[0]["segments_info"][0].update(category_id=4), "category_id 4, "),
        (_a_thing_called_stuff, "has isthing=False but class"),
        (lambda records: records.clear(), "has no images"),
    ],
)
def test_records_of_another_loader_are_checked_against_the_metadata(dataset, edit, words):
    """A loader other than register_panoptic_dataset (which checks categories itself) may give
    classes that the metadata does not have, or disagree with it on which are things."""
    dataset["register"]()
    records = DatasetCatalog.get(dataset["name"])
    edit(records)
    name = dataset["name"] + "_edited"
    DatasetCatalog.register(name, lambda: records)
    meta = MetadataCatalog.get(dataset["name"])
    keys = ("stuff_classes", "thing_classes", "thing_dataset_id_to_contiguous_id")
    MetadataCatalog.get(name).set(**{k: meta.get(k) for k in keys})
    try:
        report = check_dataset(name, pngs=False)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert any(words in error for error in report.errors), report.errors


@pytest.fixture
def instance_dataset(dataset):
    """The custom data registered as an instance (not panoptic) data set, as a detection set is:
    records without pan_seg_file_name, evaluator_type "coco"."""
    name = f"{dataset['name']}_instances"
    records = [
        {k: r[k] for k in ("file_name", "image_id")} | {"annotations": []}
        for r in dataset["records"]
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(evaluator_type="coco", thing_classes=["cat", "dog"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_data_sets_that_cannot_be_trained_on_or_evaluated_are_refused(dataset, instance_dataset):
    # They passed: the mapper stopped at the first batch, the evaluator after the whole training.
    dataset["register"]()
    cfg = _config(dataset["name"], test=[instance_dataset])
    with pytest.raises(DataCheckError, match=f"DATASETS.TEST names data set '{instance_dataset}' "):
        validate_datasets(cfg)
    assert "evaluator_type 'coco', which EfficientPS does not evaluate" in str(
        pytest.raises(DataCheckError, validate_datasets, cfg, training=False).value
    )
    with pytest.raises(DataCheckError, match=f"'{instance_dataset}', whose 2 of 2 records have no"):
        validate_datasets(_config(instance_dataset, test=[dataset["name"]]))
    # A LazyConfig with build_dataset_evaluator: as DATASETS.TEST, and one data set at a time.
    opts = ["model.sem_seg_head.num_classes=4", "model.roi_heads.num_classes=2"]
    opts += [f"dataloader.train.dataset.names={dataset['name']}"]
    test_key = "dataloader.test.dataset.names"
    for names, words in (
        (instance_dataset, f"{test_key} names data set '{instance_dataset}' of evaluator_type"),
        (f"[{dataset['name']},{dataset['name']}]", f"{test_key} names 2 data sets"),
    ):
        cfg = load_lazy_config(QUICK_PY, [*opts, f"{test_key}={names}"])
        with pytest.raises(DataCheckError, match=re.escape(words)):
            validate_datasets(cfg)
    # Another evaluator is the config's own business.
    cfg = load_lazy_config(QUICK_PY, [*opts, f"{test_key}={instance_dataset}"])
    cfg.dataloader.evaluator = {"_target_": "detectron2.evaluation.COCOEvaluator"}
    check_evaluator_types(cfg)


def test_training_without_a_training_set_is_refused_naming_the_key():
    # YAML: Detectron2's "AssertionError: ()"; LazyConfig: "No data set is named." (no key).
    cfg = _config("synthetic_panoptic_train", num_classes=6, num_things=3)
    cfg.DATASETS.TRAIN = ()
    with pytest.raises(DataCheckError, match=r"^DATASETS.TRAIN names no data set"):
        validate_datasets(cfg)
    validate_datasets(cfg, training=False)  # evaluation needs none
    cfg = load_lazy_config(QUICK_PY, ["dataloader.train.dataset.names=[]"])
    with pytest.raises(DataCheckError, match=r"^dataloader.train.dataset.names names no data"):
        validate_datasets(cfg)


def test_data_sets_that_number_their_classes_differently_are_refused(dataset):
    # Same counts, other order: Detectron2 compares thing_classes of instance data sets only, so
    # training mixed the labels and evaluation scored the classes mistaken, silently.
    dataset["register"]()
    name, other = dataset["name"], f"{dataset['name']}_swapped"
    swapped = [dict(c) for c in CUSTOM_CATEGORIES]
    swapped[2]["name"], swapped[3]["name"] = swapped[3]["name"], swapped[2]["name"]
    files = {k: dataset[k] for k in ("image_root", "panoptic_root", "panoptic_json")}
    register_panoptic_dataset(other, categories=swapped, **files)
    try:
        words = f"Data sets '{name}' and '{other}' (DATASETS.TRAIN, DATASETS.TEST) number their "
        words += f"classes differently: class 2 is 'grass' in '{name}' but 'sky' in '{other}'"
        for training in (True, False):  # evaluation reads the model's classes from the first
            with pytest.raises(DataCheckError, match=re.escape(words)):
                check_class_counts(_config(name, test=[other]), training=training)
        check_class_counts(_config(name, test=[name]))
    finally:
        DatasetCatalog.remove(other)
        MetadataCatalog.remove(other)


def test_data_sets_with_the_same_classes_but_other_things_are_refused():
    # Same class names, same counts, other classes are things (hand-made metadata: registered
    # panoptic data sets list their things first).
    names = ("check_things_first", "check_things_other")
    classes = ["road", "car", "person", "sky"]
    for name, things in zip(names, ({11: 1, 12: 2}, {11: 1, 13: 3})):
        MetadataCatalog.get(name).set(
            stuff_classes=classes, thing_dataset_id_to_contiguous_id=things
        )
    try:
        words = f"thing classes [1, 2] in '{names[0]}' but [1, 3] in '{names[1]}'"
        with pytest.raises(DataCheckError, match=re.escape(words)):
            check_class_counts(_config(names[0], test=[names[1]]))
    finally:
        for name in names:
            MetadataCatalog.remove(name)


def test_class_count_of_test_set_checked_in_eval_only(dataset):
    dataset["register"]()
    cfg = _config("synthetic_panoptic_train", num_classes=6, num_things=3, test=[dataset["name"]])
    with pytest.raises(DataCheckError, match=dataset["name"]):
        validate_datasets(cfg, training=False)


@pytest.mark.parametrize("key", ["DATASETS.TRAIN", "DATASETS.TEST"])
def test_unknown_dataset_name_suggests_closest(key):
    cfg = _config("synthetic_panoptic_train", num_classes=6, num_things=3)
    cfg.merge_from_list([key, ("synthetic_panoptc_val",)])
    with pytest.raises(DataCheckError, match=f"{key} names data set 'synthetic_panoptc_val'") as e:
        check_dataset_names(cfg)
    assert "synthetic_panoptic_val" in str(e.value)


def test_command_line_report(dataset, capsys):
    dataset["register"]()
    assert main([dataset["name"]]) == 0
    assert "No errors." in capsys.readouterr().out
    png, _ = _grayscale(dataset)
    assert main([dataset["name"], "--no-pngs"]) == 0
    assert main([dataset["name"]]) == 1
    assert png in capsys.readouterr().out
    assert main(["no_such_set"]) == 1


def test_command_line_checks_a_lazy_config(dataset, capsys):
    """--config-file takes a LazyConfig (.py) as train_net.py does, with key=value --opts."""
    dataset["register"]()
    name = dataset["name"]
    config = ["--config-file", "Synthetic-PanopticSegmentation/efficientps_b0_quick.py", "--opts"]
    opts = [f"dataloader.train.dataset.names={name}", f"dataloader.test.dataset.names={name}"]
    opts += ["model.sem_seg_head.num_classes=4"]
    assert main([name, "--no-pngs", *config, *opts, "model.roi_heads.num_classes=2"]) == 0
    assert "data set names and class counts fit" in capsys.readouterr().out
    assert main([name, "--no-pngs", *config, *opts, "model.roi_heads.num_classes=3"]) == 1
    assert "model.roi_heads.num_classes is 3" in capsys.readouterr().out


def test_command_line_checks_the_data_a_lazy_config_registers(dataset, tmp_path, capsys):
    # As README's "Data" has a LazyConfig register one's own data: the names were looked up
    # before the config was loaded, and the data set was "not registered".
    name, config = dataset["name"], tmp_path / "my_data.py"
    config.write_text(
        "from efficientps_d2 import model_zoo\n"
        "from efficientps_d2.data import register_panoptic_dataset\n"
        f"register_panoptic_dataset({name!r}, image_root={dataset['image_root']!r}, "
        f"panoptic_root={dataset['panoptic_root']!r}, panoptic_json={dataset['panoptic_json']!r})\n"
        "_base = model_zoo.get_config('Synthetic-PanopticSegmentation/efficientps_b0_quick.py')\n"
        "model, dataloader, train = _base.model, _base.dataloader, _base.train\n"
        f"dataloader.train.dataset.names = dataloader.test.dataset.names = {name!r}\n"
        "model.roi_heads.num_classes, model.sem_seg_head.num_classes = 2, 4\n"
    )
    assert main([name, "--config-file", str(config)]) == 0, capsys.readouterr().out
    assert "No errors." in capsys.readouterr().out


def test_builtin_synthetic_data_passes(tmp_path):
    from efficientps_d2.data.synthetic import ensure_synthetic_panoptic, register_synthetic

    ensure_synthetic_panoptic(str(tmp_path), num_train=3, num_val=2)
    names = register_synthetic(str(tmp_path), prefix="test_data_check_synthetic")
    try:
        for name in names:
            report = check_dataset(name)
            assert report.errors == [] and report.pngs_checked > 0, report.format()
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        shutil.rmtree(os.path.join(str(tmp_path), "synthetic_panoptic"))


def test_shipped_configs_fit_their_data_sets():
    for name in (
        "COCO-PanopticSegmentation/efficientps_b5.yaml",
        "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml",
        "Cityscapes-PanopticSegmentation/efficientps_b5.yaml",
        "Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml",
    ):
        cfg = load_config(name)
        check_dataset_names(cfg)
        check_class_counts(cfg)


def _validate_on_each_rank(datasets, out_dir):
    """One process of launch(): validate_datasets on each (name, files) of ``datasets``; writes
    this rank's verdicts and how many PNGs it opened to ``out_dir/rank<R>.json``. PNGs under a
    "crash" folder make rank 0's PNG pass raise, as a failing disk would."""
    from detectron2.utils import comm

    from efficientps_d2.data import check

    opened, check_png = [], check._check_png

    def counting_check_png(record):
        opened.append(record["pan_seg_file_name"])
        if "crash" in record["pan_seg_file_name"]:
            raise RuntimeError("disk gone")
        return check_png(record)

    check._check_png = counting_check_png
    verdicts = {}
    for name, files in datasets:
        register_panoptic_dataset(name, **files)
        try:
            (report,) = validate_datasets(_config(name))
            verdicts[name] = f"passed, {report.pngs_checked} PNGs"
        except Exception as e:
            verdicts[name] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"verdicts": verdicts, "opened": len(opened)}, f)
    # Both ranks are done; leave without the interpreter's teardown, in which torch (2.14, gloo,
    # CPU) aborts about one spawned process in four ("terminate called without an active
    # exception", SIGABRT) even after destroy_process_group: not what this test is about.
    comm.synchronize()
    os._exit(0)


def test_two_processes_read_the_pngs_once_and_share_the_verdict(tmp_path):
    datasets, png = [], None
    for kind in ("good", "bad", "crash"):
        files = write_panoptic_dataset(str(tmp_path / kind), num_images=2)
        if kind == "bad":
            png = files["records"][1]["pan_seg_file_name"]
            Image.open(png).convert("L").save(png)
        keys = ("image_root", "panoptic_root", "panoptic_json")
        datasets.append((f"test_two_ranks_{kind}", {k: files[k] for k in keys}))
    # Two gloo processes, as train_net.py --num-gpus 2 on the CPU; "auto": a free port.
    launch(_validate_on_each_rank, 2, dist_url="auto", args=(datasets, str(tmp_path)))
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    assert [r["opened"] for r in ranks] == [5, 0]  # good 2, bad 2, crash 1 (it raised): rank 0
    for verdicts in (r["verdicts"] for r in ranks):
        assert verdicts["test_two_ranks_good"] == "passed, 2 PNGs"
        assert verdicts["test_two_ranks_bad"].startswith("DataCheckError: Data set")
        assert f"Panoptic PNG '{png}' has mode L" in verdicts["test_two_ranks_bad"]
    assert ranks[0]["verdicts"]["test_two_ranks_bad"] == ranks[1]["verdicts"]["test_two_ranks_bad"]
    # A PNG pass that fails outright on rank 0 stops rank 1 too, naming it, instead of a hang.
    assert ranks[0]["verdicts"]["test_two_ranks_crash"] == "RuntimeError: disk gone"
    assert ranks[1]["verdicts"]["test_two_ranks_crash"] == (
        "DataCheckError: Data set 'test_two_ranks_crash' could not be checked on rank 0: "
        "RuntimeError('disk gone')"
    )


@pytest.mark.parametrize("root", ["missing", "my.data"])
def test_cityscapes_loader_assertions_say_what_is_wrong(tmp_path, root):
    """Detectron2's Cityscapes loader asserts "Please run createPanopticImgs.py" when the data
    set is not where it looks, and "Please generate labelTrainIds.png" when the files exist
    under a path with a '.' (it cuts paths at the first one): neither names a path."""
    from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic

    from tests.fixtures import write_cityscapes_panoptic

    base = tmp_path / root
    if root != "missing":
        write_cityscapes_panoptic(str(base), splits=("val",))
    gt = base / "cityscapes" / "gtFine"
    paths = {
        "image_root": str(base / "cityscapes" / "leftImg8bit" / "val"),
        "panoptic_root": str(gt / "cityscapes_panoptic_val"),
        "panoptic_json": str(gt / "cityscapes_panoptic_val.json"),
    }
    builtin = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    meta = {k: builtin.get(k) for k in ("thing_dataset_id_to_contiguous_id", "stuff_classes")}
    meta["stuff_dataset_id_to_contiguous_id"] = builtin.stuff_dataset_id_to_contiguous_id
    name = f"test_data_check_cityscapes_{next(_counter)}"
    DatasetCatalog.register(
        name, lambda: load_cityscapes_panoptic(*(paths[k] for k in paths), meta)
    )
    MetadataCatalog.get(name).set(evaluator_type="cityscapes_panoptic_seg", **paths, **meta)
    try:
        with pytest.raises(DataCheckError) as info:
            check_dataset(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    message = str(info.value)
    if root == "missing":
        assert f"Missing: panoptic_json '{paths['panoptic_json']}'" in message
    else:
        assert "cuts the file paths at their first '.'" in message
        assert paths["image_root"] in message
    assert "$DETECTRON2_DATASETS" in message
