"""One-call registration of any data set in COCO panoptic format.

A data set in COCO panoptic format (a folder of images, a folder of panoptic PNGs and a panoptic
json; :mod:`efficientps_d2.tools.convert_instances_to_panoptic` makes them from COCO instance
annotations) is registered with a single call, and then used by name in a config::

    from efficientps_d2.data import register_panoptic_dataset

    register_panoptic_dataset(
        "mydata_train",
        image_root="mydata/images/train",
        panoptic_root="mydata/panoptic_train",
        panoptic_json="mydata/panoptic_train.json",
    )
    cfg.DATASETS.TRAIN = ("mydata_train",)

Registration is cheap: it reads the json's categories for the metadata (unless ``categories`` is
given) and nothing else. The data set is read and checked when it is first loaded
(``DatasetCatalog.get``): every panoptic PNG and image the json names must exist, every segment's
category must be among the categories; errors name the file and the id at fault.
"""

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .metadata import panoptic_metadata

__all__ = ["load_panoptic_json", "register_panoptic_dataset"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # missing files named in one error message


def register_panoptic_dataset(
    name, *, image_root, panoptic_root, panoptic_json, categories=None, instances_json=None
):
    """Registers a COCO-panoptic-format data set with Detectron2 under ``name``.

    One call is all a user needs::

        register_panoptic_dataset(
            "mydata_train", image_root=..., panoptic_root=..., panoptic_json=...
        )

    then ``"mydata_train"`` goes in ``DATASETS.TRAIN`` (or ``DATASETS.TEST``: the metadata has
    ``evaluator_type="coco_panoptic_seg"``, evaluated with ``COCOPanopticEvaluator``).
    ``DatasetCatalog.get(name)`` yields Detectron2's "standard" panoptic dicts (see
    :func:`load_panoptic_json`); ``MetadataCatalog.get(name)`` holds what the model, the mapper and
    ``COCOPanopticEvaluator`` need (see :func:`efficientps_d2.data.metadata.panoptic_metadata`).

    The files are checked when the data set is loaded, not here; see :func:`load_panoptic_json`.

    Args:
        name: the data set's name, e.g. "mydata_train"; must not be registered yet.
        image_root: folder of the images (``images[*].file_name`` in the json, any extension).
        panoptic_root: folder of the panoptic PNGs (``annotations[*].file_name``).
        panoptic_json: the COCO panoptic json (``images``, ``annotations``, ``categories``).
        categories: the json's ``categories``; read from ``panoptic_json`` when omitted (give them
            when the json is written later, as the built-in synthetic data does).
        instances_json: optional COCO instance json of the same images, for box/mask AP.
    Returns:
        the data set's ``Metadata``.
    """
    if name in DatasetCatalog.list():
        raise ValueError(f"A data set named '{name}' is already registered.")
    source = "The categories given"
    if categories is None:
        if not os.path.isfile(panoptic_json):
            raise FileNotFoundError(
                f"Panoptic json '{panoptic_json}' (for data set '{name}') does not exist."
            )
        data = _read_json(panoptic_json)
        if not isinstance(data, dict) or "categories" not in data:
            raise ValueError(f"Panoptic json '{panoptic_json}' has no 'categories'.")
        categories = data["categories"]
        source = f"Panoptic json '{panoptic_json}'"
    try:
        metadata = panoptic_metadata(categories)
    except ValueError as e:
        raise ValueError(f"{source} (for data set '{name}'): {e}") from e
    DatasetCatalog.register(
        name, lambda: load_panoptic_json(panoptic_json, image_root, panoptic_root, metadata)
    )
    # The keys of detectron2.data.datasets.register_coco_panoptic ("standard" version).
    MetadataCatalog.get(name).set(
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        json_file=instances_json,
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        **metadata,
    )
    return MetadataCatalog.get(name)


def load_panoptic_json(json_file, image_root, panoptic_root, metadata):
    """Reads and checks a COCO panoptic data set.

    Unlike Detectron2's ``load_coco_panoptic_json``, the image file is taken from the json's
    ``images`` (any extension, not only ".jpg"), and every file and category is checked up front.

    Args:
        json_file (str): the panoptic json.
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs.
        metadata (dict): with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id`` (Detectron2's "standard" panoptic metadata).
    Returns:
        list[dict], one per json annotation, in json order, with ``file_name``, ``image_id``,
        ``height``, ``width``, ``pan_seg_file_name`` and ``segments_info`` (the json's segments with
        ``category_id`` made contiguous and ``isthing`` added).
    Raises:
        FileNotFoundError: the json, or images or PNGs it names, are missing (the first few named).
        ValueError: malformed or inconsistent json (an annotation without file name or
            segments, a segment without an integer id, unknown image id or category id,
            duplicate image ids, two annotations of one image, duplicate segment ids).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Panoptic json '{json_file}' does not exist.")
    data = _read_json(json_file)
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"Panoptic json '{json_file}' has no '{key}' list.")
    if not data["annotations"]:
        raise ValueError(f"Panoptic json '{json_file}' has no annotations.")
    for folder, what in ((image_root, "Image"), (panoptic_root, "Panoptic PNG")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{what} folder '{folder}' (of panoptic json '{json_file}') does not exist."
            )

    images = {}
    for image in data["images"]:
        if "id" not in image or "file_name" not in image:
            raise ValueError(
                f"Panoptic json '{json_file}': image entry {str(image)[:200]} needs 'id' and "
                "'file_name'."
            )
        if image["id"] in images:
            # The json's annotations, and panopticapi's scoring, find images by id: one of the
            # two would get the other's file.
            raise ValueError(
                f"Panoptic json '{json_file}': images '{images[image['id']]['file_name']}' and "
                f"'{image['file_name']}' have the same id {image['id']!r}."
            )
        images[image["id"]] = image
    things = metadata["thing_dataset_id_to_contiguous_id"]
    stuff = metadata["stuff_dataset_id_to_contiguous_id"]

    ret, annotated = [], {}
    for ann in data["annotations"]:
        _check_annotation(ann, json_file)
        image_id = ann.get("image_id")
        if image_id not in images:
            raise ValueError(
                f"Panoptic json '{json_file}': annotation '{ann.get('file_name')}' refers to image "
                f"id {image_id!r}, which is not in 'images'."
            )
        if image_id in annotated:
            # Trained on twice, and scored once: panopticapi keeps one annotation per image.
            raise ValueError(
                f"Panoptic json '{json_file}': annotations '{annotated[image_id]}' and "
                f"'{ann.get('file_name')}' are both of image id {image_id!r}."
            )
        annotated[image_id] = ann.get("file_name")
        image = images[image_id]
        segments_info, seen = [], set()
        for segment in ann.get("segments_info", []):
            category_id = segment.get("category_id")
            if segment.get("id") in seen:
                raise ValueError(
                    f"Panoptic json '{json_file}': annotation '{ann.get('file_name')}' (image id "
                    f"{image_id!r}) has segment id {segment.get('id')!r} twice."
                )
            seen.add(segment.get("id"))
            if category_id in things:
                segment = dict(segment, category_id=things[category_id], isthing=True)
            elif category_id in stuff:
                segment = dict(segment, category_id=stuff[category_id], isthing=False)
            else:
                raise ValueError(
                    f"Panoptic json '{json_file}': segment {segment.get('id')!r} of annotation "
                    f"'{ann.get('file_name')}' (image id {image_id!r}) has category_id "
                    f"{category_id!r}, which is not among the data set's categories "
                    f"{sorted(set(things) | set(stuff))}."
                )
            segments_info.append(segment)
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments_info,
        }
        for key in ("height", "width"):
            if key in image:
                record[key] = image[key]
        ret.append(record)

    missing_png = _missing(r["pan_seg_file_name"] for r in ret)
    if missing_png:
        pngs = [f for f in _listdir(panoptic_root) if f.endswith(".png")]
        if len(missing_png) == len(ret):
            raise FileNotFoundError(
                f"Panoptic json '{json_file}' does not match the PNG folder '{panoptic_root}': "
                f"none of its {len(ret)} panoptic PNGs is there "
                f"(e.g. '{os.path.basename(missing_png[0])}'); the folder holds {len(pngs)} "
                f"other PNGs{_examples(pngs)}. Are the json and folder of the same split?"
            )
        raise FileNotFoundError(
            f"{len(missing_png)} panoptic PNGs named in '{json_file}' are missing from "
            f"'{panoptic_root}': {_examples(missing_png, prefix='')}"
        )
    missing_images = _missing(r["file_name"] for r in ret)
    if missing_images:
        raise FileNotFoundError(
            f"{len(missing_images)} images named in '{json_file}' are missing from "
            f"'{image_root}': {_examples(missing_images, prefix='')}"
        )
    unused = len(images) - len(annotated)
    if unused:
        logger.warning(f"{unused} images in '{json_file}' have no panoptic annotation; skipped.")
    logger.info(f"Loaded {len(ret)} panoptic annotations from '{json_file}'.")
    return ret


def _check_annotation(ann, json_file):
    """Raises ValueError, naming the json and the annotation, for an annotation that is not COCO
    panoptic's ``{"image_id", "file_name", "segments_info": [{"id": int, "category_id", ...}]}``
    (it failed later with a bare KeyError, AttributeError or int() error)."""
    where = f"Panoptic json '{json_file}': annotation {str(ann)[:120]}"
    if not isinstance(ann, dict):
        raise ValueError(f"{where} is not an object (a dict).")
    for key, kind, what in (
        ("image_id", (int, str), "an image id"),
        ("file_name", str, "the PNG's file name"),
        ("segments_info", list, "a list of segments"),
    ):
        if not isinstance(ann.get(key), kind):
            raise ValueError(f"{where} needs '{key}' ({what}), got {ann.get(key)!r}.")
    for segment in ann["segments_info"]:
        if not isinstance(segment, dict) or not isinstance(segment.get("id"), int):
            raise ValueError(
                f"Panoptic json '{json_file}': annotation '{ann['file_name']}' has the segment "
                f"{str(segment)[:120]}, whose 'id' is not an integer (the PNG's R + 256 G + "
                "256^2 B)."
            )


def _read_json(json_file):
    with open(json_file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Panoptic json '{json_file}' is not valid json: {e}") from e


def _listdir(folder):
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _missing(paths):
    """The paths that are not files; lists each folder once (fast on folders of many files)."""
    listings, missing = {}, []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(_listdir(folder))
        if name not in listings[folder] and not os.path.isfile(path):
            missing.append(path)
    return missing


def _examples(items, prefix=" (e.g. "):
    shown = ", ".join(f"'{x}'" for x in items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    if not items:
        return ""
    return f"{prefix}{shown}{more}{')' if prefix else ''}"
