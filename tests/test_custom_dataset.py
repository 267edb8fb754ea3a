"""register_panoptic_dataset: one-call registration, metadata, and load-time validation."""

import itertools
import logging
import os
import shutil

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from efficientps_d2.data import register_panoptic_dataset
from efficientps_d2.data.metadata import thing_semantic_ids
from tests.fixtures import edit_json, write_panoptic_dataset

# CUSTOM_CATEGORIES: cat 3, dog 7 (things); grass 10, sky 12 (stuff). Things come first.
CONTIGUOUS = {3: 0, 7: 1, 10: 2, 12: 3}
_counter = itertools.count()


@pytest.fixture
def register():
    """register_panoptic_dataset under fresh names, unregistered after the test."""
    names = []

    def _register(**kwargs):
        name = f"test_custom_dataset_{next(_counter)}"
        register_panoptic_dataset(name, **kwargs)
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _paths(dataset):
    return {k: dataset[k] for k in ("image_root", "panoptic_root", "panoptic_json")}


def test_one_call_registration_round_trip(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    name = register(**_paths(dataset))
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(dataset["records"]) == 2
    for d, record in zip(dicts, dataset["records"]):
        assert d["file_name"] == record["file_name"]  # ".png" images, taken from the json
        assert os.path.isfile(d["file_name"])
        assert d["pan_seg_file_name"] == record["pan_seg_file_name"]
        assert d["image_id"] == record["image_id"]
        assert (d["height"], d["width"]) == (24, 36)
        expected = [
            dict(s, category_id=CONTIGUOUS[s["category_id"]], isthing=s["category_id"] in (3, 7))
            for s in record["segments_info"]
        ]
        assert d["segments_info"] == expected
        rgb = np.asarray(Image.open(d["pan_seg_file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in d["segments_info"]}
        crowd = [(s["id"], s["category_id"]) for s in d["segments_info"] if s["iscrowd"]]
        assert crowd == [(7002, 1)]


def test_metadata(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    meta = MetadataCatalog.get(register(**_paths(dataset), instances_json="instances.json"))
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {10: 2, 12: 3}
    assert meta.thing_classes == meta.stuff_classes == ["cat", "dog", "grass", "sky"]
    assert meta.stuff_colors[3] == [70, 130, 180]
    assert thing_semantic_ids(meta) == [0, 1]
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert meta.panoptic_root == dataset["panoptic_root"]
    assert meta.panoptic_json == dataset["panoptic_json"]
    assert meta.image_root == dataset["image_root"]
    assert meta.json_file == "instances.json"


def test_registration_is_lazy_and_takes_categories(tmp_path, register):
    root = str(tmp_path)
    paths = {
        "image_root": os.path.join(root, "images", "train"),
        "panoptic_root": os.path.join(root, "panoptic_train"),
        "panoptic_json": os.path.join(root, "panoptic_train.json"),
    }
    with pytest.raises(FileNotFoundError, match="panoptic_train.json"):
        register(**paths)  # no json to read the categories from
    dataset = write_panoptic_dataset(root)
    shutil.rmtree(dataset["panoptic_root"])
    name = register(**paths, categories=dataset["categories"])  # nothing is read or checked yet
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    with pytest.raises(FileNotFoundError, match="Panoptic PNG folder"):
        DatasetCatalog.get(name)


def test_reregistration_errors(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    name = register(**_paths(dataset))
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        register_panoptic_dataset(name, **_paths(dataset))
    assert len(DatasetCatalog.get(name)) == 2  # the first registration still works


def test_missing_png_is_named(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    os.remove(os.path.join(dataset["panoptic_root"], "img_001.png"))
    name = register(**_paths(dataset))
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    message = str(e.value)
    assert "1 panoptic PNGs" in message and "img_001.png" in message
    assert dataset["panoptic_json"] in message and dataset["panoptic_root"] in message


def test_json_not_matching_png_folder(tmp_path, register):
    train = write_panoptic_dataset(str(tmp_path), "train")
    val = write_panoptic_dataset(str(tmp_path), "val", num_images=3)
    edit_json(
        val["panoptic_json"],
        lambda d: [a.update(file_name="val_" + a["file_name"]) for a in d["annotations"]],
    )
    name = register(**dict(_paths(val), panoptic_root=train["panoptic_root"]))
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    message = str(e.value)
    assert "does not match the PNG folder" in message
    assert val["panoptic_json"] in message and train["panoptic_root"] in message
    assert "none of its 3 panoptic PNGs" in message and "val_img_000.png" in message
    assert "holds 2 other PNGs" in message and "img_000.png" in message


def test_segment_category_not_in_metadata(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(
        dataset["panoptic_json"],
        lambda d: d["annotations"][1]["segments_info"][2].update(category_id=99),
    )
    name = register(**_paths(dataset))  # categories from the json: 99 is not among them
    segment_id = dataset["records"][1]["segments_info"][2]["id"]
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(name)
    message = str(e.value)
    assert dataset["panoptic_json"] in message and "img_001.png" in message
    assert f"segment {segment_id}" in message and "category_id 99" in message
    assert "[3, 7, 10, 12]" in message


def test_missing_image_is_named(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    missing = dataset["records"][0]["file_name"]
    os.remove(missing)
    name = register(**_paths(dataset))
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    assert missing in str(e.value) and dataset["panoptic_json"] in str(e.value)


def test_images_without_an_annotation_are_counted_and_skipped(tmp_path, register, caplog):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(dataset["panoptic_json"], lambda d: d["annotations"].pop(0))
    name = register(**_paths(dataset))
    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [dataset["records"][1]["image_id"]]
    warning = f"1 images in '{dataset['panoptic_json']}' have no panoptic annotation; skipped."
    assert warning in caplog.text


def test_unknown_image_id_is_named(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(dataset["panoptic_json"], lambda d: d["annotations"][0].update(image_id=42))
    name = register(**_paths(dataset))
    with pytest.raises(ValueError, match=r"'img_000.png' refers to image id 42"):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (  # both annotations then read img_001.png's image
            lambda d: d["images"][1].update(id=1),
            r"images 'img_000.png' and 'img_001.png' have the same id 1",
        ),
        (  # one image trained on twice, scored once
            lambda d: d["annotations"][1].update(image_id=1),
            r"annotations 'img_000.png' and 'img_001.png' are both of image id 1",
        ),
    ],
)
def test_duplicate_image_ids_are_named(tmp_path, register, edit, message):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(dataset["panoptic_json"], edit)
    name = register(**_paths(dataset))
    with pytest.raises(ValueError, match=message):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "edit, message",
    [  # they failed later with a bare KeyError, AttributeError or int() error
        (lambda d: d["annotations"][0].pop("file_name"), r"needs 'file_name' .*got None"),
        (lambda d: d["annotations"][0].pop("segments_info"), r"needs 'segments_info'"),
        (lambda d: d["annotations"][0].update(segments_info={"id": 1}), r"needs 'segments_info'"),
        (lambda d: d["annotations"].append(5), r"annotation 5 is not an object"),
        (
            lambda d: d["annotations"][0]["segments_info"][0].pop("id"),
            r"annotation 'img_000.png' has the segment .*, whose 'id' is not an integer",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(id="abc"),
            r"annotation 'img_000.png' has the segment .*'abc'.*, whose 'id' is not an integer",
        ),
    ],
)
def test_malformed_annotations_are_named(tmp_path, register, edit, message):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(dataset["panoptic_json"], edit)
    name = register(**_paths(dataset))
    with pytest.raises(ValueError, match=message) as e:
        DatasetCatalog.get(name)
    assert f"Panoptic json '{dataset['panoptic_json']}'" in str(e.value)


def test_duplicate_segment_id_is_named(tmp_path, register):
    dataset = write_panoptic_dataset(str(tmp_path))
    edit_json(
        dataset["panoptic_json"],
        lambda d: d["annotations"][0]["segments_info"][1].update(
            id=d["annotations"][0]["segments_info"][0]["id"]
        ),
    )
    name = register(**_paths(dataset))
    with pytest.raises(ValueError, match=r"'img_000.png' \(image id 1\) has segment id \d+ twice"):
        DatasetCatalog.get(name)


def test_a_json_that_is_not_an_object_is_named_at_loading(tmp_path, register):
    # With the categories given, loading met the list first: AttributeError ('list' ... 'get').
    dataset = write_panoptic_dataset(str(tmp_path))
    name = register(categories=dataset["categories"], **_paths(dataset))
    with open(dataset["panoptic_json"], "w") as f:
        f.write("[]")
    with pytest.raises(ValueError, match=r"Panoptic json '.*' has no 'images' list"):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("{", r"is not valid json: Expecting property name"),  # was a bare JSONDecodeError
        (lambda d: d["categories"][0].pop("isthing"), r"Category .*'cat'.* has no 'isthing'"),
        (lambda d: d["categories"][0].update(id="3"), r"has id '3'; an integer is needed"),
        (lambda d: d.update(categories={"a": 1}), r"categories must be a list"),
    ],
)
def test_bad_categories_are_named_at_registration(tmp_path, edit, message):
    dataset = write_panoptic_dataset(str(tmp_path))
    if isinstance(edit, str):
        with open(dataset["panoptic_json"], "w") as f:
            f.write(edit)
    else:
        edit_json(dataset["panoptic_json"], edit)
    with pytest.raises(ValueError, match=message) as e:
        register_panoptic_dataset("test_custom_dataset_bad_categories", **_paths(dataset))
    assert f"Panoptic json '{dataset['panoptic_json']}'" in str(e.value)
    assert "test_custom_dataset_bad_categories" not in DatasetCatalog.list()


def test_a_data_set_without_thing_classes_is_named_as_such():
    """Its empty thing_dataset_id_to_contiguous_id was reported as missing ("needs
    'thing_dataset_id_to_contiguous_id' and ...")."""
    meta = {"name": "stuff_only", "thing_dataset_id_to_contiguous_id": {}}
    meta["stuff_dataset_id_to_contiguous_id"] = {1: 0, 2: 1}
    with pytest.raises(ValueError, match="'stuff_only' has no thing classes .* at least one"):
        thing_semantic_ids(meta)
