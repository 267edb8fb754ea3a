"""Tiny, valid panoptic data sets written in the exact on-disk layouts their loaders read.

* :func:`write_cityscapes_panoptic`: the layout of Detectron2's ``cityscapes_fine_panoptic_*``
  (``<root>/cityscapes/...``), with the panoptic json/PNGs made by cityscapesscripts'
  ``createPanopticImgs`` itself from the raw ``gtFine`` label images.
* :func:`write_coco_panoptic`: the layout of Detectron2's ``coco_2017_*_panoptic``
  (``<root>/coco/...``), with real COCO category ids and the 133 COCO panoptic categories.
* :func:`write_panoptic_dataset`: a custom COCO-panoptic data set (PNG images, non-contiguous
  category ids) for :func:`efficientps_d2.data.register_panoptic_dataset`.

Point ``DETECTRON2_DATASETS`` at ``root`` (before detectron2 is imported) for the built-ins.
Each function returns what the loader should yield, for assertions: per split a list of
``{"image_id", "file_name", "pan_seg_file_name", "segments_info"}``, with the segments'
*dataset* category ids (``id``, ``category_id``, ``iscrowd``, ``area``, ``bbox``).
"""

import contextlib
import io
import json
import os

import numpy as np
from PIL import Image

__all__ = [
    "CUSTOM_CATEGORIES",
    "write_cityscapes_panoptic",
    "write_coco_panoptic",
    "write_image",
    "write_panoptic_dataset",
]

# A custom data set's categories: non-contiguous ids, things and stuff interleaved.
CUSTOM_CATEGORIES = [
    {"id": 3, "name": "cat", "isthing": 1, "color": [220, 20, 60]},
    {"id": 7, "name": "dog", "isthing": 1, "color": [0, 0, 142]},
    {"id": 10, "name": "grass", "isthing": 0, "color": [152, 251, 152]},
    {"id": 12, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
]


def write_image(path, height, width, seed=0):
    """Writes a random RGB image (format from the extension: .png, .jpg)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _id_to_rgb(id_map):
    id_map = id_map.astype(np.int64)
    return np.stack([id_map % 256, id_map // 256 % 256, id_map // 256**2], -1).astype(np.uint8)


def _paint(height, width, regions):
    """An id map from ``(segment_id, (y0, y1, x0, x1))`` boxes painted in order (0 = void)."""
    id_map = np.zeros((height, width), dtype=np.int64)
    for segment_id, (y0, y1, x0, x1) in regions:
        id_map[y0:y1, x0:x1] = segment_id
    return id_map


def _segments_info(id_map, categories):
    """COCO panoptic segments_info of an id map; ``categories``: id -> (category_id, iscrowd)."""
    info = []
    for segment_id in np.unique(id_map):
        if segment_id == 0:
            continue
        ys, xs = np.nonzero(id_map == segment_id)
        category_id, iscrowd = categories[int(segment_id)]
        bbox = [int(xs.min()), int(ys.min())]
        bbox += [int(xs.max()) - bbox[0] + 1, int(ys.max()) - bbox[1] + 1]
        info.append(
            {
                "id": int(segment_id),
                "category_id": category_id,
                "iscrowd": iscrowd,
                "bbox": bbox,
                "area": int(len(ys)),
            }
        )
    return info


# ---------------------------------------------------------------------------------------------
# Cityscapes


def _cityscapes_instance_ids(height, width, shift):
    """A Cityscapes ``*_gtFine_instanceIds.png`` map: stuff = labelId, things = labelId*1000+k,
    thing pixels without instance (crowd) = labelId. ``shift`` moves the objects sideways."""
    s = shift
    return _paint(
        height,
        width,
        [
            (23, (0, height // 3, 0, width)),  # sky
            (11, (height // 3, height // 2, 0, width)),  # building
            (7, (height // 2, height, 0, width)),  # road
            (1, (height - 4, height, 0, 6)),  # ego vehicle: ignoreInEval -> void
            (24001, (8, 26, 6 + s, 12 + s)),  # person 1
            (24002, (10, 26, 14 + s, 20 + s)),  # person 2
            (26001, (18, 28, 26 + s, 40 + s)),  # car
            (26, (20, 28, 46, 58)),  # car group without instance id -> crowd
        ],
    )


def write_cityscapes_panoptic(root, splits=("train", "val"), *, height=32, width=64):
    """Writes ``<root>/cityscapes`` as Detectron2's ``cityscapes_fine_panoptic_{split}`` read it.

    Files per image ``<city>_000000_000019`` (train: cities aachen and bochum; val: frankfurt)::

        cityscapes/leftImg8bit/<split>/<city>/<city>_000000_000019_leftImg8bit.png
        cityscapes/gtFine/<split>/<city>/<city>_000000_000019_gtFine_{labelIds,instanceIds,
            labelTrainIds}.png
        cityscapes/gtFine/cityscapes_panoptic_<split>.json                      (createPanopticImgs)
        cityscapes/gtFine/cityscapes_panoptic_<split>/<city>_000000_000019_gtFine_panoptic.png

    Detectron2's loader also needs ``*_gtFine_labelTrainIds.png`` (it asserts the first one
    exists); the labelIds/instanceIds files are what Cityscapes' evaluators read.

    Returns:
        {split: [record]} as described in the module docstring (Cityscapes label ids).
    """
    from cityscapesscripts.helpers.labels import id2label
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    cities = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}
    base = os.path.join(root, "cityscapes")
    gt_root = os.path.join(base, "gtFine")
    train_id = np.full(256, 255, dtype=np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256 and 0 <= label.trainId < 255:
            train_id[label_id] = label.trainId

    expected = {}
    for split in splits:
        expected[split] = []
        for i, city in enumerate(cities[split]):
            stem = f"{city}_000000_000019"
            image_file = os.path.join(base, "leftImg8bit", split, city, stem + "_leftImg8bit.png")
            write_image(image_file, height, width, seed=i)
            gt_dir = os.path.join(gt_root, split, city)
            os.makedirs(gt_dir, exist_ok=True)
            instance_ids = _cityscapes_instance_ids(height, width, shift=2 * i)
            label_ids = np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids)
            Image.fromarray(instance_ids.astype(np.uint16)).save(
                os.path.join(gt_dir, stem + "_gtFine_instanceIds.png")
            )
            Image.fromarray(label_ids.astype(np.uint8)).save(
                os.path.join(gt_dir, stem + "_gtFine_labelIds.png")
            )
            Image.fromarray(train_id[label_ids]).save(
                os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png")
            )
            # What createPanopticImgs makes of it: ignoreInEval labels are void, a thing label
            # without instance id is a crowd segment, segment id = instanceIds value.
            ignored = [k for k, label in id2label.items() if label.ignoreInEval]
            kept = np.where(np.isin(label_ids, ignored), 0, instance_ids)
            categories = {
                int(v): (
                    (int(v // 1000), 0) if v >= 1000 else (int(v), int(id2label[v].hasInstances))
                )
                for v in np.unique(kept)
            }
            expected[split].append(
                {
                    "image_id": stem,
                    "file_name": image_file,
                    "pan_seg_file_name": os.path.join(
                        gt_root, f"cityscapes_panoptic_{split}", stem + "_gtFine_panoptic.png"
                    ),
                    "sem_seg_file_name": os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png"),
                    "segments_info": _segments_info(kept, categories),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        convert2panoptic(cityscapesPath=gt_root, outputFolder=gt_root, setNames=list(splits))
    return expected


# ---------------------------------------------------------------------------------------------
# COCO

# (image id, shift) per split; a few real COCO 2017 file names.
_COCO_IMAGES = {"train": [(9, 0), (25, 3)], "val": [(139, 1)]}
# Real COCO panoptic category ids: person 1, car 3, dog 18 (things); road 149, tree-merged 184,
# sky-other-merged 187 (stuff).
_COCO_THINGS, _COCO_STUFF = (1, 3, 18), (149, 184, 187)


def _coco_regions(height, width, shift):
    """Segments as ((category_id, iscrowd), box); segment ids are derived from colours later."""
    s = shift
    return [
        ((187, 0), (0, height // 3, 0, width)),
        ((184, 0), (height // 3, height // 2, 0, width)),
        ((149, 0), (height // 2, height - 3, 0, width)),  # bottom 3 rows stay void
        ((1, 0), (6, 30, 4 + s, 12 + s)),
        ((1, 0), (8, 30, 14 + s, 22 + s)),
        ((1, 1), (20, 34, 40, 47)),  # a crowd of people
        ((3, 0), (22, 32, 24 + s, 38 + s)),
        ((18, 0), (26, 34, 2, 8)),
    ]


def write_coco_panoptic(root, splits=("train", "val"), *, height=40, width=48, instances=True):
    """Writes ``<root>/coco`` as Detectron2's ``coco_2017_{split}_panoptic`` read it::

        coco/{split}2017/<12-digit id>.jpg
        coco/panoptic_{split}2017/<12-digit id>.png
        coco/annotations/panoptic_{split}2017.json
        coco/annotations/instances_{split}2017.json   (with ``instances``; the ``json_file`` of the
                                                        registration's metadata, for box/mask AP)

    Segment ids are like COCO's: the RGB of the category colour, nudged per instance.

    Returns:
        {split: [record]} as described in the module docstring (COCO category ids).
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from pycocotools import mask as mask_util

    colors = {c["id"]: c["color"] for c in COCO_CATEGORIES}
    categories = [
        {"supercategory": c["name"], "isthing": c["isthing"], "id": c["id"], "name": c["name"]}
        for c in COCO_CATEGORIES
    ]
    base = os.path.join(root, "coco")
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    expected = {}
    for split in splits:
        images, annotations, instances_anns, records = [], [], [], []
        for image_id, shift in _COCO_IMAGES[split]:
            stem = f"{image_id:012d}"
            image_file = os.path.join(base, f"{split}2017", stem + ".jpg")
            write_image(image_file, height, width, seed=image_id)
            regions, segment_categories, nudge = [], {}, {}
            for (category_id, iscrowd), box in _coco_regions(height, width, shift):
                r, g, b = colors[category_id]
                k = nudge[category_id] = nudge.get(category_id, -1) + 1
                segment_id = (r + k) % 256 + 256 * g + 256**2 * b
                assert segment_id not in segment_categories, "segment id collision"
                regions.append((segment_id, box))
                segment_categories[segment_id] = (category_id, iscrowd)
            id_map = _paint(height, width, regions)
            png = os.path.join(base, f"panoptic_{split}2017", stem + ".png")
            os.makedirs(os.path.dirname(png), exist_ok=True)
            Image.fromarray(_id_to_rgb(id_map)).save(png)
            segments = _segments_info(id_map, segment_categories)
            images.append(
                {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
            )
            annotations.append(
                {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
            )
            for s in segments:
                if s["category_id"] in _COCO_THINGS:
                    rle = mask_util.encode(np.asfortranarray((id_map == s["id"]).astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    instances_anns.append(
                        {
                            "id": len(instances_anns) + 1,
                            "image_id": image_id,
                            "category_id": s["category_id"],
                            "segmentation": rle,
                            "area": s["area"],
                            "bbox": s["bbox"],
                            "iscrowd": s["iscrowd"],
                        }
                    )
            records.append(
                {
                    "image_id": image_id,
                    "file_name": image_file,
                    "pan_seg_file_name": png,
                    "segments_info": segments,
                }
            )
        _write_json(
            os.path.join(base, "annotations", f"panoptic_{split}2017.json"),
            {"images": images, "annotations": annotations, "categories": categories},
        )
        if instances:
            _write_json(
                os.path.join(base, "annotations", f"instances_{split}2017.json"),
                {
                    "images": images,
                    "annotations": instances_anns,
                    "categories": [
                        {k: c[k] for k in ("supercategory", "id", "name")}
                        for c in categories
                        if c["isthing"]
                    ],
                },
            )
        expected[split] = records
    return expected


# ---------------------------------------------------------------------------------------------
# Custom


def write_panoptic_dataset(root, split="train", *, num_images=2, height=24, width=36):
    """Writes a small custom COCO-panoptic data set with :data:`CUSTOM_CATEGORIES`::

        <root>/images/<split>/img_<i>.png        (PNG images: not Detectron2's ".jpg" assumption)
        <root>/panoptic_<split>/img_<i>.png
        <root>/panoptic_<split>.json

    Each image has grass and sky, two cats, a dog, a crowd of dogs and a void strip.

    Returns:
        dict with ``image_root``, ``panoptic_root``, ``panoptic_json``, ``categories`` and
        ``records`` (list of records as in the module docstring, dataset category ids).
    """
    image_root = os.path.join(root, "images", split)
    panoptic_root = os.path.join(root, f"panoptic_{split}")
    os.makedirs(panoptic_root, exist_ok=True)
    segment_categories = {12000: (12, 0), 10000: (10, 0), 3001: (3, 0), 3002: (3, 0)}
    segment_categories.update({7001: (7, 0), 7002: (7, 1)})
    images, annotations, records = [], [], []
    for i in range(num_images):
        s = i
        id_map = _paint(
            height,
            width,
            [
                (12000, (0, height // 2, 0, width)),
                (10000, (height // 2, height - 2, 0, width)),
                (3001, (4, 14, 2 + s, 8 + s)),
                (3002, (6, 16, 10 + s, 14 + s)),
                (7001, (12, 20, 18, 26)),
                (7002, (10, 22, 28, 34)),
            ],
        )
        name = f"img_{i:03d}"
        image_file = os.path.join(image_root, name + ".png")
        write_image(image_file, height, width, seed=100 + i)
        png = os.path.join(panoptic_root, name + ".png")
        Image.fromarray(_id_to_rgb(id_map)).save(png)
        segments = _segments_info(id_map, segment_categories)
        images.append({"id": i + 1, "file_name": name + ".png", "height": height, "width": width})
        annotations.append(
            {"image_id": i + 1, "file_name": name + ".png", "segments_info": segments}
        )
        records.append(
            {
                "image_id": i + 1,
                "file_name": image_file,
                "pan_seg_file_name": png,
                "segments_info": segments,
            }
        )
    panoptic_json = os.path.join(root, f"panoptic_{split}.json")
    _write_json(
        panoptic_json,
        {"images": images, "annotations": annotations, "categories": CUSTOM_CATEGORIES},
    )
    return {
        "image_root": image_root,
        "panoptic_root": panoptic_root,
        "panoptic_json": panoptic_json,
        "categories": CUSTOM_CATEGORIES,
        "records": records,
    }


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def edit_json(path, edit):
    """Rewrites the json file at ``path`` after ``edit(data)`` changed it in place."""
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
