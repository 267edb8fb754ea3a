"""COCO instances (+ semantic PNGs) -> COCO panoptic conversion."""

import json
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from PIL import Image
from pycocotools import mask as mask_util

from efficientps_d2.atomic_io import temporary_path
from efficientps_d2.data.coco_panoptic import register_panoptic_dataset
from efficientps_d2.tools import convert_instances_to_panoptic as convert
from efficientps_d2.tools.convert_instances_to_panoptic import (
    ConversionError,
    convert_instances_to_panoptic,
    main,
)
from tests.fixtures import edit_json

H, W = 20, 30
THINGS = [{"id": 1, "name": "person"}, {"id": 2, "name": "car", "supercategory": "vehicle"}]
STUFF = [{"id": 5, "name": "road"}, {"id": 6, "name": "sky", "color": [70, 130, 180]}]


def _box(y0, y1, x0, x1, height=H, width=W):
    m = np.zeros((height, width), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(mask):
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = np.asfortranarray(mask).ravel(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ids(png):
    rgb = np.asarray(Image.open(png)).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _segments(id_map, categories, crowd=()):
    """Expected segments_info of a hand-built id map, sorted by id."""
    out = []
    for i in np.unique(id_map):
        if i == 0:
            continue
        ys, xs = np.nonzero(id_map == i)
        x0, y0 = int(xs.min()), int(ys.min())
        out.append(
            {
                "id": int(i),
                "category_id": categories[int(i)],
                "iscrowd": int(i in crowd),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(len(xs)),
            }
        )
    return out


def _ann(ann_id, image_id, category_id, segmentation, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
    }


def write_example(root):
    """Two images. Image 1: a polygon person (10), an uncompressed-RLE car (11), a compressed-RLE
    person (12) on the car, a crowd of cars (13) under the car, a person (14) identical to 12
    (ties: the lower id wins, so 14 is fully covered), a semantic PNG with sky/road, a void
    column and "person" pixels no instance covers. Image 2: one annotation outside the image."""
    sem_dir = os.path.join(root, "semantic")
    os.makedirs(os.path.join(sem_dir, "sub"), exist_ok=True)
    sem = np.zeros((H, W), dtype=np.uint8)
    sem[:10], sem[10:] = 6, 5
    sem[:14, 29] = 0  # void
    sem[:2, :4] = 1  # "person" with no instance -> void
    Image.fromarray(sem).save(os.path.join(sem_dir, "a.png"))
    sem2 = np.full((H, W), 6, dtype=np.uint8)
    sem2[-1] = 0
    Image.fromarray(sem2, mode="L").convert("P").save(os.path.join(sem_dir, "sub", "b.png"))
    person12 = _box(8, 12, 14, 18)
    data = {
        "info": {"description": "example"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "sub/b.jpg", "height": H, "width": W},
        ],
        "annotations": [
            _ann(10, 1, 1, [[2, 2, 8, 2, 8, 12, 2, 12]]),  # polygon
            _ann(11, 1, 2, _uncompressed_rle(_box(5, 15, 10, 22))),
            _ann(12, 1, 1, _compressed_rle(person12)),
            _ann(13, 1, 2, _uncompressed_rle(_box(14, 20, 20, 30)), iscrowd=1),
            _ann(14, 1, 1, _uncompressed_rle(person12)),
            _ann(20, 2, 1, [[100, 100, 110, 100, 110, 110]]),  # outside the image
        ],
        "categories": THINGS,
    }
    instances = os.path.join(root, "instances.json")
    with open(instances, "w") as f:
        json.dump(data, f)
    stuff_json = os.path.join(root, "stuff.json")
    with open(stuff_json, "w") as f:
        json.dump(STUFF, f)
    return instances, sem_dir, stuff_json


def expected_id_maps():
    a = np.zeros((H, W), dtype=np.int64)
    a[:10], a[10:] = 6000, 5000  # sky, road
    a[:14, 29] = 0
    a[:2, :4] = 0
    a[14:20, 20:30] = 2002  # crowd (car #2 by annotation id)
    a[5:15, 10:22] = 2001  # a car beats a crowd, whatever the areas
    a[2:12, 2:8] = 1001  # polygon person
    a[8:12, 14:18] = 1002  # small person on the car
    b = np.full((H, W), 6000, dtype=np.int64)
    b[-1] = 0
    return a, b


def _convert(root, **kwargs):
    instances, sem_dir, stuff_json = write_example(root)
    out_json, out_dir = os.path.join(root, "out", "panoptic.json"), os.path.join(root, "out", "png")
    kwargs.setdefault("semantic_dir", sem_dir)
    kwargs.setdefault("stuff_categories", stuff_json)
    report = convert_instances_to_panoptic(instances, out_json, out_dir, **kwargs)
    return report, out_json, out_dir


def test_convert_exact_output(tmp_path):
    report, out_json, out_dir = _convert(str(tmp_path))
    a, b = expected_id_maps()
    np.testing.assert_array_equal(_ids(os.path.join(out_dir, "a.png")), a)
    np.testing.assert_array_equal(_ids(os.path.join(out_dir, "sub", "b.png")), b)

    with open(out_json) as f:
        data = json.load(f)
    assert data["info"] == {"description": "example"}
    assert [i["id"] for i in data["images"]] == [1, 2]
    assert data["categories"] == [
        {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
        {"id": 2, "name": "car", "supercategory": "vehicle", "isthing": 1},
        {"id": 5, "name": "road", "supercategory": "road", "isthing": 0},
        {"id": 6, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
    ]
    cats = {1001: 1, 1002: 1, 2001: 2, 2002: 2, 5000: 5, 6000: 6}
    ann_a, ann_b = data["annotations"]
    assert ann_a["image_id"] == 1 and ann_a["file_name"] == "a.png"
    assert ann_a["segments_info"] == _segments(a, cats, crowd=(2002,))
    assert ann_b == {"image_id": 2, "file_name": "sub/b.png", "segments_info": _segments(b, cats)}
    by_id = {s["id"]: s for s in ann_a["segments_info"]}
    assert by_id[2001]["area"] == 120 - 16 and by_id[2002]["area"] == 60 - 2
    assert by_id[2002]["iscrowd"] == 1 and by_id[2002]["bbox"] == [20, 14, 10, 6]

    # Overlaps: person 12/14 on the car (16 px), the car on the crowd (2 px).
    assert report.overlap_pixels == {1: 18} and report.total_overlap_pixels == 18
    assert report.dropped == [
        dict(image_id=1, annotation_id=14, category_id=1, reason="fully covered", covered_by=[12]),
        dict(image_id=2, annotation_id=20, category_id=1, reason="empty mask", covered_by=[]),
    ]
    assert report.unassigned_thing_pixels == {1: 8}
    assert (report.num_images, report.num_thing_segments) == (2, 3)
    assert (report.num_crowd_segments, report.num_stuff_segments) == (1, 3)
    json.dumps(report.to_dict())
    assert "annotation 14" in report.summary()


def test_convert_without_semantic(tmp_path):
    report, out_json, out_dir = _convert(
        str(tmp_path), semantic_dir=None, stuff_categories=None, things_only=True
    )
    a, _ = expected_id_maps()
    a[a >= 5000] = 0
    np.testing.assert_array_equal(_ids(os.path.join(out_dir, "a.png")), a)
    with open(out_json) as f:
        assert [c["id"] for c in json.load(f)["categories"]] == [1, 2]
    assert report.num_stuff_segments == 0 and report.overlap_pixels == {1: 18}


def test_round_trip_pq_100(tmp_path):
    _, out_json, out_dir = _convert(str(tmp_path))
    images = os.path.join(str(tmp_path), "images")
    for name in ("a.jpg", "sub/b.jpg"):
        os.makedirs(os.path.dirname(os.path.join(images, name)), exist_ok=True)
        Image.new("RGB", (W, H)).save(os.path.join(images, name))
    name = "test_convert_round_trip"
    try:
        register_panoptic_dataset(
            name, image_root=images, panoptic_root=out_dir, panoptic_json=out_json
        )
        evaluator = COCOPanopticEvaluator(name, output_dir=str(tmp_path / "eval"))
        evaluator.reset()
        for d in DatasetCatalog.get(name):
            segments = [
                {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                for s in d["segments_info"]
            ]
            panoptic = torch.as_tensor(_ids(d["pan_seg_file_name"]), dtype=torch.int32)
            evaluator.process([d], [{"panoptic_seg": (panoptic, segments)}])
        result = evaluator.evaluate()["panoptic_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert result[key] == pytest.approx(100.0), (key, result)


def _set_ann(index, **values):
    return lambda data: data["annotations"][index].update(values)


@pytest.mark.parametrize(
    "edit, semantic_edit, expected",
    [
        (_set_ann(1, image_id=99), None, ["annotation 11", "image id 99"]),
        (_set_ann(2, category_id=7), None, ["annotation 12", "category_id 7"]),
        (
            _set_ann(2, category_id=5, iscrowd=1),
            None,
            ["annotation 12", "crowd of the stuff category 5"],
        ),
        (
            _set_ann(0, segmentation=[[2, 2, 8, 2, 8]]),
            None,
            ["annotation 10", "(image 1)", "malformed polygon", "[2, 2, 8, 2, 8]"],
        ),
        (_set_ann(0, segmentation=[[1, 2, 3, 4]]), None, ["annotation 10", "malformed polygon"]),
        (_set_ann(0, segmentation={"x": 1}), None, ["annotation 10", "malformed segmentation"]),
        (
            _set_ann(1, segmentation={"size": [H + 1, W], "counts": [0, (H + 1) * W]}),
            None,
            ["annotation 11", f"size [{H + 1}, {W}]"],
        ),
        (
            _set_ann(1, segmentation={"size": [H, W], "counts": [5, 10]}),
            None,
            ["annotation 11", "uncompressed RLE", f"{H * W}"],
        ),
        (_set_ann(1, iscrowd=2), None, ["annotation 11", "iscrowd=2"]),
        (None, ("sub/b.png", "missing"), ["sub/b.png", "image 2", "is missing"]),
        (None, ("sub/b.png", "size"), ["sub/b.png", "image 2", f"{W + 1}x{H}", f"{W}x{H}"]),
        (None, ("a.png", "value"), ["a.png", "image 1", "values [9]"]),
        (None, ("a.png", "rgb"), ["a.png", "image 1", "mode 'RGB'"]),
        # PIL's "image file is truncated" named no file, and was a traceback on the command line.
        (None, ("sub/b.png", "truncated"), ["sub/b.png", "image 2", "cannot be read"]),
        (None, ("a.png", "not a png"), ["a.png", "image 1", "cannot be read"]),
    ],
)
def test_bad_input_names_culprit_and_writes_nothing(tmp_path, edit, semantic_edit, expected):
    root = str(tmp_path)
    instances, sem_dir, stuff_json = write_example(root)
    if edit is not None:
        edit_json(instances, edit)
    if semantic_edit is not None:
        name, kind = semantic_edit
        path = os.path.join(sem_dir, name)
        if kind == "missing":
            os.remove(path)
        elif kind == "size":
            Image.new("L", (W + 1, H)).save(path)
        elif kind == "truncated":
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:60])
        elif kind == "not a png":
            with open(path, "w") as f:
                f.write("not a png")
        elif kind == "value":
            sem = np.asarray(Image.open(path)).copy()
            sem[3, 3] = 9
            Image.fromarray(sem).save(path)
        else:
            Image.new("RGB", (W, H)).save(path)
    before = sorted(os.listdir(root))
    out_json, out_dir = os.path.join(root, "panoptic.json"), os.path.join(root, "panoptic")
    with pytest.raises(ConversionError) as e:
        convert_instances_to_panoptic(
            instances, out_json, out_dir, semantic_dir=sem_dir, stuff_categories=stuff_json
        )
    message = str(e.value)
    for part in expected:
        assert part in message, (part, message)
    if not semantic_edit:
        assert instances in message
    # Image 2's semantic PNG fails after image 1's panoptic PNG was written: still no output,
    # and no temporary files left.
    assert sorted(os.listdir(root)) == before


@pytest.mark.parametrize(
    "content, message",
    [
        ([], "holds a list, not a COCO json object"),  # was AttributeError: 'list' ... 'get'
        ({"images": [], "categories": [], "annotations": {"a": 1}}, "'annotations' are not a list"),
    ],
)
def test_instance_json_that_is_not_a_coco_object_is_named(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConversionError, match=message) as e:
        convert_instances_to_panoptic(str(path), str(tmp_path / "p.json"), str(tmp_path / "p"))
    assert str(path) in str(e.value) and sorted(os.listdir(tmp_path)) == ["instances.json"]


def test_bad_categories(tmp_path):
    root = str(tmp_path)
    instances, sem_dir, _ = write_example(root)
    out = os.path.join(root, "p.json"), os.path.join(root, "p")
    # Without isthing, --stuff-categories says which of the json's categories are stuff.
    with pytest.raises(ConversionError, match=r"\[2\] have other names.*'car' and 'car-stuff'"):
        convert_instances_to_panoptic(
            instances, *out, stuff_categories=[{"id": 2, "name": "car-stuff"}]
        )
    # Categories without isthing: which are stuff must be said, never guessed.
    with pytest.raises(ConversionError, match="no 'isthing'.*--stuff-categories.*--things-only"):
        convert_instances_to_panoptic(instances, *out, semantic_dir=sem_dir)
    with pytest.raises(ConversionError, match="no stuff"):
        convert_instances_to_panoptic(instances, *out, things_only=True, semantic_dir=sem_dir)
    edit_json(instances, lambda d: d["categories"][0].update(isthing=1))
    with pytest.raises(ConversionError, match=r"\[2\] have no 'isthing' while others"):
        convert_instances_to_panoptic(instances, *out)
    edit_json(instances, lambda d: d["categories"][1].update(isthing=1))
    with pytest.raises(ConversionError, match=r"\[2\].*both thing categories"):
        convert_instances_to_panoptic(
            instances, *out, stuff_categories=[{"id": 2, "name": "car-stuff"}]
        )
    with pytest.raises(ConversionError, match="need stuff_categories"):
        convert_instances_to_panoptic(instances, *out, semantic_dir=sem_dir)
    edit_json(instances, lambda d: d["categories"].append({"id": 0, "name": "void", "isthing": 0}))
    with pytest.raises(ConversionError, match=r"'void' has id 0"):
        convert_instances_to_panoptic(instances, *out)
    assert not os.path.exists(out[0]) and not os.path.exists(out[1])


def test_atomic_failure_while_writing_keeps_previous_output(tmp_path, monkeypatch):
    root = str(tmp_path)
    _, out_json, out_dir = _convert(root)
    with open(out_json) as f:
        previous = f.read()
    listing = sorted(os.listdir(os.path.dirname(out_json)))

    with pytest.raises(FileExistsError, match="overwrite"):
        _convert(root)

    def fail(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(convert._AtomicOutput, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        _convert(root, overwrite=True)
    with open(out_json) as f:
        assert f.read() == previous
    assert sorted(os.listdir(os.path.dirname(out_json))) == listing
    assert sorted(os.listdir(out_dir)) == ["a.png", "sub"]


def test_atomic_first_failure_leaves_nothing(tmp_path, monkeypatch):
    calls, write_png = [], convert._AtomicOutput.write_png

    def fail_second(self, name, rgb):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        write_png(self, name, rgb)

    monkeypatch.setattr(convert._AtomicOutput, "write_png", fail_second)
    with pytest.raises(OSError):
        _convert(str(tmp_path))
    assert calls == ["a.png", "sub/b.png"]
    assert os.listdir(os.path.join(str(tmp_path), "out")) == []


def test_overwrite_replaces_output(tmp_path):
    root = str(tmp_path)
    _convert(root)
    stale = os.path.join(root, "out", "png", "stale.png")
    Image.new("RGB", (2, 2)).save(stale)
    instances = os.path.join(root, "instances.json")
    out_json, out_dir = os.path.join(root, "out", "panoptic.json"), os.path.join(root, "out", "png")
    report = convert_instances_to_panoptic(
        instances, out_json, out_dir, overwrite=True, things_only=True
    )
    assert not os.path.exists(stale) and report.num_stuff_segments == 0
    assert sorted(os.listdir(os.path.join(root, "out"))) == ["panoptic.json", "png"]


def test_command_line(tmp_path, capsys):
    root = str(tmp_path)
    instances, sem_dir, stuff_json = write_example(root)
    out_json, out_dir = os.path.join(root, "p.json"), os.path.join(root, "p")
    args = ["--instances", instances, "--output-json", out_json, "--output-dir", out_dir]
    args += ["--semantic-dir", sem_dir, "--stuff-categories", stuff_json]
    assert main(args + ["--report", os.path.join(root, "report.json")]) == 0
    assert "Overlapping instance pixels: 18" in capsys.readouterr().out
    with open(os.path.join(root, "report.json")) as f:
        assert json.load(f)["overlap_pixels"] == [{"image_id": 1, "pixels": 18}]
    assert main(args) == 1
    assert "exists" in capsys.readouterr().err
    os.remove(os.path.join(sem_dir, "a.png"))
    assert main(args + ["--overwrite"]) == 1
    assert "a.png" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out_dir, "a.png"))  # the previous output is intact


def _panoptic_to_detection(panoptic_json, panoptic_folder, keep_isthing):
    """COCO panoptic -> detection format as panopticapi's panoptic2detection_coco_format.py makes
    it: one compressed-RLE annotation per segment (stuff too), ids 0, 1, ... in order, and the
    categories without "isthing" and "color" (``keep_isthing`` keeps "isthing")."""
    with open(panoptic_json) as f:
        data = json.load(f)
    annotations = []
    for ann in data["annotations"]:
        ids = _ids(os.path.join(panoptic_folder, ann["file_name"]))
        for s in ann["segments_info"]:
            rle = mask_util.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
            segment = {k: v for k, v in s.items() if k != "id"}
            segment.update(image_id=ann["image_id"], id=len(annotations))
            segment["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append(segment)
    drop = ("color",) if keep_isthing else ("color", "isthing")
    categories = [{k: v for k, v in c.items() if k not in drop} for c in data["categories"]]
    return dict(data, annotations=annotations, categories=categories)


def test_detection_format_round_trip_keeps_stuff_as_stuff(tmp_path):
    from panopticapi.evaluation import pq_compute

    from tests.fixtures import write_coco_panoptic

    write_coco_panoptic(str(tmp_path), splits=("train",), instances=False)
    gt_json = str(tmp_path / "coco" / "annotations" / "panoptic_train2017.json")
    gt_folder = str(tmp_path / "coco" / "panoptic_train2017")
    with open(gt_json) as f:
        gt_categories = {c["id"]: c for c in json.load(f)["categories"]}
    categories_file = tmp_path / "panoptic_coco_categories.json"  # with isthing, as COCO's
    categories_file.write_text(json.dumps(list(gt_categories.values())))

    for keep_isthing in (True, False):
        detection = tmp_path / f"detection_{keep_isthing}.json"
        detection.write_text(json.dumps(_panoptic_to_detection(gt_json, gt_folder, keep_isthing)))
        out_json, out_dir = tmp_path / f"out_{keep_isthing}.json", tmp_path / f"png_{keep_isthing}"
        if not keep_isthing:
            # What panopticapi writes has no isthing: nothing says which categories are stuff.
            with pytest.raises(ConversionError, match="no 'isthing'.*--stuff-categories"):
                convert_instances_to_panoptic(str(detection), str(out_json), str(out_dir))
            assert not out_json.exists() and not out_dir.exists()
        report = convert_instances_to_panoptic(
            str(detection),
            str(out_json),
            str(out_dir),
            stuff_categories=None if keep_isthing else str(categories_file),
        )
        assert (report.num_images, report.num_stuff_segments) == (2, 6)
        assert (report.num_thing_segments, report.num_crowd_segments) == (8, 2)
        assert report.overlap_pixels == {} and report.dropped == []
        with open(out_json) as f:
            categories = json.load(f)["categories"]
        assert {c["id"]: c["isthing"] for c in categories} == {
            i: c["isthing"] for i, c in gt_categories.items()
        }
        result = pq_compute(gt_json, str(out_json), gt_folder=gt_folder, pred_folder=str(out_dir))
        for kind in ("All", "Things", "Stuff"):
            assert result[kind]["pq"] == pytest.approx(1.0), (keep_isthing, kind, result)
        assert result["Stuff"]["n"] == 3 and result["Things"]["n"] == 3


def test_stuff_annotations_lie_under_instances_and_merge_per_category(tmp_path):
    """Stuff annotations: under every instance whatever their size, the smaller stuff region
    winning among stuff, one segment per stuff category; semantic PNGs fill only what is left."""
    root = str(tmp_path)
    instances, sem_dir, stuff_json = write_example(root)

    def add_stuff(data):
        data["annotations"] += [
            _ann(30, 1, 5, _compressed_rle(_box(0, 20, 0, 30))),  # road everywhere
            _ann(31, 1, 6, _compressed_rle(_box(0, 4, 0, 30))),  # sky strip on top of the road
            _ann(32, 1, 6, [[0, 16, 4, 16, 4, 20, 0, 20]]),  # more sky: one segment with 31
        ]

    edit_json(instances, add_stuff)
    out_json, out_dir = os.path.join(root, "p.json"), os.path.join(root, "p")
    report = convert_instances_to_panoptic(
        instances, out_json, out_dir, semantic_dir=sem_dir, stuff_categories=stuff_json
    )
    a = expected_id_maps()[0]
    want = np.full((H, W), 5000, dtype=np.int64)
    want[:4] = 6000
    want[16:20, 0:4] = 6000
    things = (a > 0) & (a % 1000 > 0)
    want[things] = a[things]
    np.testing.assert_array_equal(_ids(os.path.join(out_dir, "a.png")), want)
    with open(out_json) as f:
        segments = json.load(f)["annotations"][0]["segments_info"]
    cats = {1001: 1, 1002: 1, 2001: 2, 2002: 2, 5000: 5, 6000: 6}
    assert segments == _segments(want, cats, crowd=(2002,))
    # Image 2 has no stuff annotation: its semantic PNG still gives the stuff.
    np.testing.assert_array_equal(
        _ids(os.path.join(out_dir, "sub", "b.png")), expected_id_maps()[1]
    )
    assert report.num_stuff_segments == 3 and report.dropped[0]["annotation_id"] == 14


def test_leftovers_of_a_killed_conversion_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # What a conversion killed mid-way leaves: the PNG folder's hidden workspace and the json's
    # temporary file. Another output's temporary file is not this conversion's to remove.
    workspace = temporary_path(str(out / "png"))
    os.makedirs(os.path.join(workspace, "new"))
    with open(os.path.join(workspace, "new", "a.png"), "wb") as f:
        f.write(b"half")
    with open(temporary_path(str(out / "panoptic.json")), "w") as f:
        f.write("{")
    other = temporary_path(str(out / "other.json"))
    open(other, "w").close()
    _convert(str(tmp_path))
    assert sorted(os.listdir(out)) == [os.path.basename(other), "panoptic.json", "png"]


@pytest.mark.parametrize(
    "out_json, out_dir, culprit",
    [
        ("p.json", "semantic", "is or holds the semantic PNG folder"),  # its PNGs were replaced
        ("../p.json", ".", "is or holds the instance json"),  # the input folder was deleted
        ("instances.json", "png", "is the instance json"),  # converted in place
        ("stuff.json", "png", "is the stuff category json"),
        ("p.json", "semantic/png", "lies inside the semantic PNG folder"),
        ("png/p.json", "png", "json '.*png/p.json' must not be or lie inside the output PNG"),
        ("png", "png", "json '.*png' must not be or lie inside the output PNG"),  # fails at the end
    ],
)
def test_outputs_that_would_replace_an_input_are_refused(tmp_path, out_json, out_dir, culprit):
    root = str(tmp_path)
    write_example(root)
    before = {
        os.path.join(folder, f): open(os.path.join(folder, f), "rb").read()
        for folder, _, files in os.walk(root)
        for f in files
    }
    with pytest.raises(ConversionError, match=culprit):
        convert_instances_to_panoptic(
            os.path.join(root, "instances.json"),
            os.path.join(root, out_json),
            os.path.join(root, out_dir),
            semantic_dir=os.path.join(root, "semantic"),
            stuff_categories=os.path.join(root, "stuff.json"),
            overwrite=True,
        )
    for path, data in before.items():
        with open(path, "rb") as f:
            assert f.read() == data, path


@pytest.mark.parametrize(
    "report, culprit",
    [
        ("instances.json", "report '.*instances.json' is the instance json"),
        ("stuff.json", "report '.*stuff.json' is the stuff category json"),
        (
            "p.json",
            "report '.*p.json' is the output json '.*p.json': writing it would replace "
            "the output",
        ),
        ("png/r.json", "report '.*png/r.json' must not be or lie inside the output PNG folder"),
        ("png", "report '.*png' must not be or lie inside the output PNG folder"),
    ],
)
def test_a_report_that_would_replace_an_input_or_output_is_refused(
    tmp_path, monkeypatch, capsys, report, culprit
):
    root = str(tmp_path)
    instances, sem_dir, stuff_json = write_example(root)
    before = {
        os.path.join(folder, f): open(os.path.join(folder, f), "rb").read()
        for folder, _, files in os.walk(root)
        for f in files
    }
    painted = []
    monkeypatch.setattr(convert, "_convert_image", lambda *a: painted.append(a))
    argv = ["--instances", instances, "--semantic-dir", sem_dir, "--stuff-categories", stuff_json]
    argv += ["--output-json", os.path.join(root, "p.json"), "--output-dir"]
    argv += [os.path.join(root, "png"), "--report", os.path.join(root, report), "--overwrite"]
    assert main(argv) == 1
    assert re.search(culprit, capsys.readouterr().err), culprit
    assert painted == [] and sorted(os.listdir(root)) == [
        "instances.json",
        "semantic",
        "stuff.json",
    ]
    for path, data in before.items():
        with open(path, "rb") as f:
            assert f.read() == data, path


def test_unwritable_outputs_are_refused_before_converting(tmp_path, monkeypatch, capsys):
    root = str(tmp_path)
    instances, sem_dir, stuff_json = write_example(root)
    os.makedirs(os.path.join(root, "folder.json"))
    open(os.path.join(root, "file"), "w").close()
    painted = []
    monkeypatch.setattr(convert, "_convert_image", lambda *a: painted.append(a))
    args = ["--instances", instances, "--semantic-dir", sem_dir, "--stuff-categories", stuff_json]
    for outputs, message in [
        (["folder.json", "png"], "The output json '.*folder.json' is a folder"),
        (
            ["p.json", "file/png"],
            "Cannot make the output PNG folder '.*file/png': '.*file' is not a folder",
        ),
        (["file/p.json", "png"], "Cannot write the output json '.*file/p.json'"),
        (["p.json", "png", "--report", "folder.json"], "The report '.*folder.json' is a folder"),
    ]:
        out = [os.path.join(root, p) if p != "--report" else p for p in outputs]
        argv = args + ["--output-json", out[0], "--output-dir", out[1], *out[2:], "--overwrite"]
        assert main(argv) == 1
        assert re.search(message, capsys.readouterr().err), message
    assert main(["--instances", sem_dir, "--output-json", "p.json", "--output-dir", "p"]) == 1
    assert "instance json '" + sem_dir + "' is a folder" in capsys.readouterr().err
    assert painted == [] and sorted(os.listdir(root)) == [
        "file",
        "folder.json",
        "instances.json",
        "semantic",
        "stuff.json",
    ]
