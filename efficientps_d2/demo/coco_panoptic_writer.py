"""Writes panoptic predictions in COCO panoptic format (PNGs + one json).

The format is the one panopticapi and Detectron2's ``COCOPanopticEvaluator`` read: one RGB PNG per
image whose pixels hold the segment id as ``R + 256 G + 256^2 B`` (0: void), and a json with
"images", "annotations" (``image_id``, ``file_name`` of the PNG, ``segments_info``) and
"categories". Category ids in the json are the **data set's own** ids, mapped back from the model's
contiguous ids with the metadata's ``thing/stuff_dataset_id_to_contiguous_id``, so the json can be
evaluated against the data set's ground truth with ``panopticapi.evaluation.pq_compute``, or
registered itself as a data set (``efficientps_d2.data.register_panoptic_dataset``).

``image_id`` is what ``pq_compute`` matches predictions to ground truth by, so it must be the
ground truth's own id: :class:`ImageIds` finds it from an image's file name (in a COCO "images"
list, or a data set's ``panoptic_json``), or from a numeric COCO file name
("000000142238.jpg" -> 142238).

Files are written atomically (temporary file, then rename).
"""

import json
import logging
import os

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

from ..atomic_io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CocoPanopticWriter",
    "ImageIds",
    "id_to_rgb",
    "panoptic_categories",
    "to_coco_segments",
]


def id_to_rgb(ids):
    """(H, W) integer segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B.

    panopticapi's ``id2rgb``, refusing ids that do not fit in 24 bits instead of wrapping them.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"Segment ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}].")
    return id2rgb(ids)


def _inverse_maps(metadata):
    things = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    stuff = getattr(metadata, "stuff_dataset_id_to_contiguous_id", None)
    if things is None or stuff is None:
        name = getattr(metadata, "name", "?")
        raise ValueError(
            f"The metadata of '{name}' lacks 'thing_dataset_id_to_contiguous_id' / "
            "'stuff_dataset_id_to_contiguous_id': the COCO panoptic export needs a panoptic data "
            "set's metadata (DATASETS.TEST) to map class ids back to the data set's category ids."
        )
    return {v: k for k, v in things.items()}, {v: k for k, v in stuff.items()}


def _class_name_and_color(metadata, contiguous_id):
    # "Standard" panoptic metadata lists every class in both stuff_classes and thing_classes.
    for kind in ("stuff", "thing"):
        names = getattr(metadata, f"{kind}_classes", None) or []
        if contiguous_id < len(names):
            colors = getattr(metadata, f"{kind}_colors", None) or []
            color = list(colors[contiguous_id]) if contiguous_id < len(colors) else None
            return names[contiguous_id], color
    return f"class {contiguous_id}", None


def panoptic_categories(metadata):
    """COCO panoptic "categories" (id, name, isthing, color) of a data set, by dataset id."""
    things, stuff = _inverse_maps(metadata)
    categories = []
    for contiguous, dataset_id in list(things.items()) + list(stuff.items()):
        isthing = contiguous in things
        name, color = _class_name_and_color(metadata, contiguous)
        category = {"id": int(dataset_id), "name": name, "isthing": int(isthing)}
        if color is not None:
            category["color"] = [int(c) for c in color]
        categories.append(category)
    return sorted(categories, key=lambda c: c["id"])


def to_coco_segments(panoptic_seg, segments_info, metadata):
    """The model's ``segments_info`` as COCO panoptic segments of the data set.

    Args:
        panoptic_seg: (H, W) integer segment ids (tensor or array); 0 is void.
        segments_info: the model's segment dicts ("id", "category_id" contiguous, "isthing",
            optional "score").
        metadata: the data set's metadata (see :func:`panoptic_categories`).
    Returns:
        list of {"id", "category_id" (dataset id), "iscrowd": 0, "isthing", "area", "bbox"
        (XYWH), and "score" for things}; segments without pixels are left out.
    """
    # Not the model's thing -> semantic map: COCO panoptic files hold the data set's own ids.
    things, stuff = _inverse_maps(metadata)
    ids = np.asarray(panoptic_seg.cpu() if hasattr(panoptic_seg, "cpu") else panoptic_seg)
    present, areas = np.unique(ids, return_counts=True)
    area_of = dict(zip(present.tolist(), areas.tolist()))
    segments = []
    for s in segments_info:
        area = area_of.get(int(s["id"]), 0)
        if area == 0:
            continue
        isthing = bool(s.get("isthing", s["category_id"] in things))
        table = things if isthing else stuff
        if s["category_id"] not in table:
            raise ValueError(
                f"Segment {s['id']} has {'thing' if isthing else 'stuff'} class "
                f"{s['category_id']}, which the metadata's "
                f"{'thing' if isthing else 'stuff'}_dataset_id_to_contiguous_id does not map "
                f"(it maps {sorted(table)}): the model's classes do not match the data set's."
            )
        rows, cols = np.nonzero(ids == s["id"])
        segment = {
            "id": int(s["id"]),
            "category_id": int(table[s["category_id"]]),
            "iscrowd": 0,
            "isthing": int(isthing),
            "area": int(area),
            "bbox": [
                int(cols.min()),
                int(rows.min()),
                int(cols.max() - cols.min() + 1),
                int(rows.max() - rows.min() + 1),
            ],
        }
        if isthing and "score" in s:
            segment["score"] = float(s["score"])
        segments.append(segment)
    return segments


class ImageIds:
    """Maps input image files to a data set's image ids, by file name.

    Built from a COCO "images" list (``{"id", "file_name"}`` entries). An input matches an entry
    whose ``file_name`` it ends with ("val2017/000000142238.jpg" matches "000000142238.jpg", and
    "x/frankfurt/a.png" matches "frankfurt/a.png"); a base name shared by several entries needs
    the longer path to decide. Files that match nothing get the integer of a numeric stem
    ("000000142238.jpg" -> 142238), else the stem itself (a string, which no COCO ground truth
    holds: :attr:`unmatched` lists those files).

    Args:
        images: COCO "images" entries.
        source: where they come from, for messages.
    """

    def __init__(self, images=(), source="image list"):
        self.source = source
        self._by_base = {}
        for i, image in enumerate(images):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise ValueError(
                    f"{source}: images[{i}] = {str(image)[:120]} needs an 'id' and a 'file_name'."
                )
            name = os.path.normpath(str(image["file_name"]).replace("\\", "/"))
            self._by_base.setdefault(os.path.basename(name), []).append((name, image["id"]))
        self.unmatched = []

    def __len__(self):
        return sum(len(v) for v in self._by_base.values())

    @classmethod
    def from_json(cls, path):
        """From a json file holding a COCO "images" list, or a dict with one (a COCO json)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image list '{path}' does not exist.")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Image list '{path}' is not valid json: {e}") from e
        images = data.get("images") if isinstance(data, dict) else data
        if not isinstance(images, list):
            raise ValueError(
                f"Image list '{path}' holds neither a list of images nor a dict with an 'images' "
                "list (a COCO json)."
            )
        return cls(images, source=f"'{path}'")

    @classmethod
    def from_dataset(cls, dataset_name, metadata):
        """The images of a registered data set: its ``panoptic_json``'s "images", else its
        DatasetCatalog dicts ("file_name", "image_id"); empty (with a warning) if neither loads."""
        panoptic_json = getattr(metadata, "panoptic_json", None)
        if panoptic_json and os.path.isfile(panoptic_json):
            return cls.from_json(panoptic_json)
        from detectron2.data import DatasetCatalog

        if dataset_name in DatasetCatalog.list():
            try:
                dicts = DatasetCatalog.get(dataset_name)
            except Exception as e:  # a data set whose files are not on this machine
                logger.warning(f"Data set '{dataset_name}' does not load ({e}): no image ids.")
            else:
                images = [{"id": d["image_id"], "file_name": d["file_name"]} for d in dicts]
                return cls(images, source=f"data set '{dataset_name}'")
        return cls(source=f"data set '{dataset_name}'")

    def lookup(self, path, default=None):
        """The image id of ``path`` (see the class docstring); ``default`` in place of the stem
        for a file that matches nothing (e.g. the stem made unique among the inputs)."""
        image_id, matched = self._resolve(path, default)
        if not matched:
            self.unmatched.append(os.path.normpath(os.path.abspath(path)))
        return image_id

    def check_unique(self, paths, defaults=None):
        """Raises ValueError, naming both files, where two of ``paths`` get the same id (two
        numeric COCO names alike, or two files matching one image): predictions.json holds one
        prediction per image id. ``defaults``: {path: the ``default`` given to :meth:`lookup`}."""
        seen = {}
        for path in paths:
            image_id, _ = self._resolve(path, (defaults or {}).get(path))
            if image_id in seen:
                raise ValueError(
                    f"'{seen[image_id]}' and '{path}' both get the image id {image_id!r}"
                    ": predictions.json needs one prediction per image. Process "
                    "them in separate runs, or give them their own ids with --image-info."
                )
            seen[image_id] = path

    def _resolve(self, path, default):
        """(image id, whether a listed image or a numeric name gave it)."""
        path = os.path.normpath(os.path.abspath(path))
        candidates = self._by_base.get(os.path.basename(path), [])
        if len(candidates) > 1:
            candidates = [c for c in candidates if path.endswith(os.sep + c[0])]
        if len(candidates) == 1:
            return candidates[0][1], True
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.isdigit():
            return int(stem), True
        return (stem if default is None else default), False


class CocoPanopticWriter:
    """Collects predictions and writes COCO panoptic PNGs and json.

    ``add`` writes one PNG to ``png_dir`` right away; ``write_json`` writes ``json_file`` with
    everything added so far (call it at the end, also after an error, to keep partial output).
    An earlier run's ``json_file`` is removed before the first PNG is written: it describes the
    PNGs this run replaces, and a run killed before ``write_json`` left it next to PNGs of two
    runs, segment ids and classes of one scored against the other's (silently wrong PQ).

    Args:
        json_file: the json to write (e.g. ``out/predictions.json``).
        png_dir: folder of the PNGs (e.g. ``out/panoptic``).
        metadata: the data set's metadata (class names and id maps).
    """

    def __init__(self, json_file, png_dir, metadata):
        self.json_file = json_file
        self.png_dir = png_dir
        self.metadata = metadata
        self.categories = panoptic_categories(metadata)  # fails early without id maps
        self.images, self.annotations = [], []
        self._image_ids = {}

    def add(
        self, image_id, image_file_name, panoptic_seg, segments_info, height, width, png_name=None
    ):
        """Writes the PNG of one image and records its annotation.

        Args:
            image_id: the image's id: the ground truth's id to be scored against it (see
                :class:`ImageIds`), else e.g. the file name without extension.
            image_file_name: the image's file name ("images[*].file_name" in the json).
            panoptic_seg, segments_info: the model's "panoptic_seg" output.
            height, width: the image size.
            png_name: the PNG's file name (default ``<image_id>.png``).
        Returns:
            the PNG's path.
        """
        if image_id in self._image_ids:
            raise ValueError(
                f"Two images have the image id {image_id!r} ('{self._image_ids[image_id]}' and "
                f"'{image_file_name}'): predictions.json needs one prediction per image."
            )
        ids = np.asarray(panoptic_seg.cpu() if hasattr(panoptic_seg, "cpu") else panoptic_seg)
        segments = to_coco_segments(ids, segments_info, self.metadata)
        # Pixels of segments that were left out (none in practice) become void, so the PNG and
        # the json always agree.
        listed = np.isin(ids, [s["id"] for s in segments])
        ids = np.where(listed, ids, 0)
        png_name = png_name or f"{image_id}.png"
        png_path = os.path.join(self.png_dir, png_name)
        if not self.images and os.path.lexists(self.json_file):
            logger.info(f"Removing the earlier '{self.json_file}': its PNGs are being replaced.")
            os.remove(self.json_file)
        atomic_write(png_path, lambda f: Image.fromarray(id_to_rgb(ids)).save(f, format="PNG"))
        self._image_ids[image_id] = image_file_name
        self.images.append(
            {"id": image_id, "file_name": image_file_name, "height": height, "width": width}
        )
        self.annotations.append(
            {"image_id": image_id, "file_name": png_name, "segments_info": segments}
        )
        return png_path

    def write_json(self, partial=None):
        """Writes the json (atomically) and returns its path. ``partial``: why it lacks images
        (a run stopped early), recorded as ``info["partial"]``."""
        info = {"description": "EfficientPS panoptic predictions (efficientps_d2)"}
        if partial:
            info["partial"] = partial
        data = {
            "info": info,
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }
        atomic_write(self.json_file, lambda f: json.dump(data, f), mode="w")
        return self.json_file
