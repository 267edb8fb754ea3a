"""Converts COCO *instance* or *detection-format* annotations (plus optional semantic PNGs for
stuff) to COCO panoptic.

Annotation tools (CVAT, LabelMe exports, COCO itself) write instance annotations: one polygon or
RLE per object, possibly overlapping. COCO's panoptic *detection format* (what panopticapi's
``converters/panoptic2detection_coco_format.py`` writes) is the same json with stuff regions as
annotations too and ``isthing`` on every category. Panoptic segmentation needs one label per pixel.
This module paints the annotations (and the stuff of optional semantic PNGs) into COCO panoptic
PNGs and a panoptic json that :func:`efficientps_d2.data.register_panoptic_dataset` registers
directly::

    python -m efficientps_d2.tools.convert_instances_to_panoptic --instances instances_train.json \\
        --output-json panoptic_train.json --output-dir panoptic_train \\
        [--semantic-dir semantic_train --stuff-categories stuff.json | --things-only]

Conventions (all deterministic):

* **Things and stuff.** Categories with ``isthing`` (the detection format) say it themselves: 1 is
  a thing, 0 stuff, and stuff stays stuff. Without ``isthing`` the json's categories are things and
  **stuff** categories are given separately (``stuff_categories``, a list of
  ``{"id", "name"[, "color", "supercategory"]}`` or a json file of that list), or ``things_only``
  (``--things-only``) says there is no stuff; neither is an error, never a guess. Stuff categories
  given separately add to the json's. Category ids must be positive integers, unique across things
  and stuff.
* **Stuff annotations** (annotations of stuff categories; not crowd) give stuff regions; all the
  regions of one stuff category in an image form one segment.
* **Semantic PNGs** (optional, stuff only): one single-channel PNG per image in ``semantic_dir``, at
  the image's ``file_name`` with the extension replaced by ``.png`` (sub-folders kept), of the
  image's size. A pixel holds a stuff category id; ``0`` (:data:`SEMANTIC_VOID`) is void. 8-bit
  (``L``/``P``) and 16-bit PNGs are read. Pixels holding a *thing* category id are void unless an
  instance covers them (things come from the instance annotations only); they are counted in the
  report's ``unassigned_thing_pixels``.
* **Instances paint over stuff.** Where instances overlap, the **smaller one wins** (area of its
  own decoded mask), so small objects stay visible; equal areas go to the **lower annotation id**.
  Crowd annotations (``iscrowd=1``) lie under every non-crowd instance and become crowd segments.
  Stuff annotations lie under every instance (crowd included), the smaller winning among them;
  semantic-PNG stuff fills only the pixels no annotation covers.
  The report counts the overlapping pixels of each image; an annotation left with no pixel (or
  with an empty mask) is dropped and listed in the report with the annotations that covered it.
* **Segment ids** follow Detectron2's ``label_divisor = 1000`` convention: a stuff segment's id is
  ``category_id * 1000``; the k-th surviving thing/crowd segment of a category (k = 1, 2, ... in
  annotation id order) has id ``category_id * 1000 + k``. Void is 0. The PNG stores
  ``id = R + 256 * G + 256**2 * B``. Hence at most 999 instances of one category per image and
  category ids below 16777.
* Each panoptic PNG is named like its image with a ``.png`` extension (sub-folders kept).
* **Atomic output**: the PNGs and the json are written to temporary names next to their targets and
  renamed only once everything succeeded; an error leaves no output (and, with ``overwrite``,
  the previous output intact).

Bad input raises :class:`ConversionError` (a ``ValueError``) naming the file, the image id or
annotation id, and the offending value.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image
from pycocotools import mask as mask_util

from ..atomic_io import (
    atomic_directory,
    atomic_write,
    check_writable_file,
    check_writable_folder,
    remove_stale_temporaries_of,
)

__all__ = [
    "ConversionError",
    "PanopticConversionReport",
    "LABEL_DIVISOR",
    "SEMANTIC_VOID",
    "convert_instances_to_panoptic",
    "main",
]

#: Pixel value meaning "void" in the semantic PNGs.
SEMANTIC_VOID = 0
#: Segment id = category_id * LABEL_DIVISOR + instance index (0 for stuff).
LABEL_DIVISOR = 1000
_MAX_SEGMENT_ID = 256**3 - 1


class ConversionError(ValueError):
    """Invalid converter input; the message names the file, image/annotation id and value."""


@dataclass
class PanopticConversionReport:
    """What :func:`convert_instances_to_panoptic` did.

    Attributes:
        num_images: images written (one panoptic PNG and one json annotation each).
        num_thing_segments: non-crowd thing segments written.
        num_crowd_segments: crowd segments written.
        num_stuff_segments: stuff segments written.
        overlap_pixels: ``{image_id: n}``, pixels covered by two or more annotations (crowd and
            stuff ones included), for the images that have any.
        dropped: one dict per dropped annotation: ``image_id``, ``annotation_id``, ``category_id``,
            ``reason`` ("empty mask" or "fully covered") and ``covered_by`` (annotation ids).
        unassigned_thing_pixels: ``{image_id: n}``, semantic-PNG pixels labelled with a thing
            category that no instance covers (written as void).
    """

    num_images: int = 0
    num_thing_segments: int = 0
    num_crowd_segments: int = 0
    num_stuff_segments: int = 0
    overlap_pixels: Dict[Any, int] = field(default_factory=dict)
    dropped: List[Dict[str, Any]] = field(default_factory=list)
    unassigned_thing_pixels: Dict[Any, int] = field(default_factory=dict)

    @property
    def total_overlap_pixels(self):
        return sum(self.overlap_pixels.values())

    def to_dict(self):
        """A json-serialisable dict (per-image counts as lists of ``{"image_id", "pixels"}``)."""
        d = asdict(self)
        for key in ("overlap_pixels", "unassigned_thing_pixels"):
            d[key] = [{"image_id": k, "pixels": v} for k, v in d[key].items()]
        d["total_overlap_pixels"] = self.total_overlap_pixels
        return d

    def summary(self):
        lines = [
            f"{self.num_images} images: {self.num_thing_segments} thing, "
            f"{self.num_crowd_segments} crowd and {self.num_stuff_segments} stuff segments.",
            f"Overlapping instance pixels: {self.total_overlap_pixels} in "
            f"{len(self.overlap_pixels)} images (the smaller instance wins).",
            f"Dropped annotations: {len(self.dropped)}.",
        ]
        for d in self.dropped:
            lines.append(
                f"  image {d['image_id']!r}, annotation {d['annotation_id']} "
                f"(category {d['category_id']}): {d['reason']}"
                + (f" by annotations {d['covered_by']}" if d["covered_by"] else "")
            )
        if self.unassigned_thing_pixels:
            lines.append(
                f"Semantic pixels of thing classes without an instance (made void): "
                f"{sum(self.unassigned_thing_pixels.values())} in "
                f"{len(self.unassigned_thing_pixels)} images."
            )
        return "\n".join(lines)


def convert_instances_to_panoptic(
    instances_json,
    output_json,
    output_dir,
    *,
    semantic_dir=None,
    stuff_categories=None,
    things_only=False,
    overwrite=False,
):
    """Converts a COCO instance or detection-format json (+ optional semantic PNGs) to COCO
    panoptic format.

    See the module docstring for the conventions (things and stuff, void value, overlap rule,
    segment ids).

    Args:
        instances_json (str): COCO instance json (``images``, ``annotations``, ``categories``), or
            COCO panoptic detection format (the same, with stuff annotations and ``isthing`` on
            every category); segmentations as polygons, uncompressed RLE or compressed RLE.
        output_json (str): panoptic json to write.
        output_dir (str): folder of panoptic PNGs to write.
        semantic_dir (str or None): folder of semantic PNGs with stuff category ids.
        stuff_categories (list[dict] or str or None): stuff categories, or a json file holding
            them (a list, or a dict with a "categories" list). Required with ``semantic_dir``
            unless the json's categories include stuff (``isthing`` 0).
        things_only (bool): the json's categories (without ``isthing``) are all things and there
            is no stuff. Categories without ``isthing`` need this or ``stuff_categories``.
        overwrite (bool): replace existing outputs (atomically) instead of raising.

    Returns:
        PanopticConversionReport
    """
    inputs = _inputs(instances_json, semantic_dir, stuff_categories)
    _check_outputs_spare_inputs(output_json, output_dir, inputs)
    _check_writable(output_json, output_dir)
    if not overwrite:
        for path in (output_json, output_dir):
            if os.path.lexists(path):
                raise FileExistsError(f"'{path}' exists; pass overwrite=True (--overwrite).")
    if things_only and (stuff_categories is not None or semantic_dir is not None):
        raise ConversionError(
            "things_only (--things-only) says there is no stuff; it cannot come with "
            "stuff_categories (--stuff-categories) or semantic PNGs (--semantic-dir)."
        )
    if semantic_dir is not None and not os.path.isdir(semantic_dir):
        raise FileNotFoundError(f"Semantic PNG folder '{semantic_dir}' does not exist.")

    data = _load_json(instances_json, "instance json")
    if not isinstance(data, dict):
        raise ConversionError(
            f"'{instances_json}' holds a {type(data).__name__}, not a COCO json object with "
            "'images', 'annotations' and 'categories'."
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(f"'{instances_json}' has no '{key}' list.")
    if not isinstance(data.get("annotations") or [], list):
        raise ConversionError(f"'{instances_json}': its 'annotations' are not a list.")
    stuff_source = None
    if stuff_categories is not None:
        stuff_source = "stuff categories"
        if isinstance(stuff_categories, (str, os.PathLike)):
            stuff_source = str(stuff_categories)
            stuff_categories = _load_json(stuff_source, "stuff category json")
        if isinstance(stuff_categories, dict):
            stuff_categories = stuff_categories.get("categories")
        if not isinstance(stuff_categories, list):
            raise ConversionError(f"{stuff_source}: expected a list of categories.")
    things, stuff = _split_categories(
        data["categories"], instances_json, stuff_categories, stuff_source, things_only
    )
    if semantic_dir is not None and not stuff:
        raise ConversionError(
            f"Semantic PNGs ('{semantic_dir}') need stuff_categories (--stuff-categories) to say "
            "which ids they hold."
        )

    images = _check_images(data["images"], instances_json)
    anns_per_image = {image_id: [] for image_id in images}
    seen_ann_ids = set()
    for ann in data.get("annotations") or []:
        _check_annotation(ann, instances_json, images, things, stuff, seen_ann_ids)
        anns_per_image[ann["image_id"]].append(ann)

    report = PanopticConversionReport()
    categories = sorted(list(things.values()) + list(stuff.values()), key=lambda c: c["id"])
    out_annotations = []
    with _AtomicOutput(output_json, output_dir, overwrite) as out:
        for image_id, image in images.items():
            segments_info, id_map = _convert_image(
                image, anns_per_image[image_id], things, stuff, semantic_dir, report, instances_json
            )
            png_name = image["_png_name"]
            out.write_png(png_name, id2rgb(id_map))
            out_annotations.append(
                {"image_id": image_id, "file_name": png_name, "segments_info": segments_info}
            )
            report.num_images += 1
        result = {key: data[key] for key in ("info", "licenses") if key in data}  # kept as they are
        result["images"] = [
            {k: v for k, v in image.items() if k != "_png_name"} for image in images.values()
        ]
        result["annotations"] = out_annotations
        result["categories"] = categories
        out.write_json(result)
    return report


# ---------------------------------------------------------------------------------------------
# Input checks


def _inputs(instances_json, semantic_dir, stuff_categories):
    """(what, path) of the files and folders a conversion reads; None where not given."""
    inputs = [("instance json", instances_json), ("semantic PNG folder", semantic_dir)]
    if isinstance(stuff_categories, (str, os.PathLike)):
        inputs.append(("stuff category json", stuff_categories))
    return inputs


def _check_outputs_spare_inputs(output_json, output_dir, inputs, report=None):
    """Refuses outputs that would replace an input or each other: an output file (the json; the
    report, written last) written over an input file or an output file, or inside the PNG
    folder, or the PNG folder (replaced whole) being, holding or lying in an input."""
    real_dir = os.path.realpath(output_dir)
    files = [("output json", output_json)] + ([("report", report)] if report else [])
    for i, (what_out, out) in enumerate(files):
        real_out = os.path.realpath(out)
        if real_out == real_dir or real_out.startswith(real_dir + os.sep):
            raise ConversionError(
                f"The {what_out} '{out}' must not be or lie inside the output PNG folder "
                f"'{output_dir}'."
            )
        for what, path in inputs + files[:i]:
            if path is not None and os.path.realpath(path) == real_out:
                raise ConversionError(
                    f"The {what_out} '{out}' is the {what} '{path}': writing it would replace "
                    f"the {'input' if (what, path) in inputs else 'output'}. Choose another "
                    f"{what_out}."
                )
    for what, path in inputs:
        if path is None:
            continue
        real = os.path.realpath(path)
        if real == real_dir or real.startswith(real_dir + os.sep):
            raise ConversionError(
                f"The output PNG folder '{output_dir}' is or holds the {what} '{path}': writing "
                "the folder (--overwrite replaces it whole) would delete the input. Choose "
                "another output folder."
            )
        if real_dir.startswith(real + os.sep):
            raise ConversionError(
                f"The output PNG folder '{output_dir}' lies inside the {what} '{path}'. Choose "
                "an output folder outside it."
            )


def _check_writable(output_json, output_dir=None, what="output json"):
    """Fails before any work where an output cannot be written: a json path that is a folder, or
    a file where a folder above an output must be."""
    check_writable_file(output_json, what, ConversionError)
    if output_dir:  # replaced whole (or refused without overwrite), whatever it is
        check_writable_folder(output_dir, "output PNG folder", ConversionError, replaced=True)


def _load_json(path, what):
    if os.path.isdir(path):
        raise ConversionError(f"The {what} '{path}' is a folder, not a json file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} '{path}' does not exist.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"The {what} '{path}' is not valid json: {e}") from e


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _split_categories(categories, source, stuff_list, stuff_source, things_only):
    """(things, stuff), each {id: category}: the json's categories split by their ``isthing``,
    or (without it) by ``stuff_list``'s ids or ``things_only``, never guessed; plus the stuff
    categories of ``stuff_list`` that the json lacks."""
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ConversionError(f"{source}: category {c!r} needs an 'id' and a 'name'.")
    flagged = [c for c in categories if "isthing" in c]
    if flagged and len(flagged) < len(categories):
        missing = [c["id"] for c in categories if "isthing" not in c]
        raise ConversionError(
            f"'{source}': categories {missing[:10]} have no 'isthing' while others have one; give "
            "every category isthing 1 (thing) or 0 (stuff)."
        )
    for c in flagged:
        if c["isthing"] not in (0, 1):  # True/False compare equal to 1/0
            raise ConversionError(
                f"'{source}': category {c.get('id')!r} has isthing={c['isthing']!r}; 0 or 1 "
                "expected."
            )
    if stuff_list is not None:
        # A COCO panoptic categories list (with isthing) may serve: its stuff entries count.
        stuff_list = [c for c in stuff_list if not (isinstance(c, dict) and c.get("isthing"))]
        extra = _check_categories(stuff_list, stuff_source, isthing=0)
    if flagged:
        if things_only and any(not c["isthing"] for c in flagged):
            raise ConversionError(
                f"'{source}' has stuff categories (isthing 0), but things_only (--things-only) "
                "says there is none."
            )
        is_stuff = {c["id"]: not c["isthing"] for c in flagged}
    elif stuff_list is None and not things_only:
        raise ConversionError(
            f"'{source}': its categories have no 'isthing', so nothing says which are stuff. "
            "Stuff must stay stuff: add isthing (1 thing, 0 stuff) to every category (COCO "
            "panoptic detection format), pass the stuff categories (--stuff-categories, e.g. "
            "COCO's panoptic_coco_categories.json), or state that all are things (--things-only)."
        )
    else:  # without isthing, --stuff-categories says which of the json's categories are stuff
        ids = set(extra) if stuff_list is not None else set()
        is_stuff = {c["id"]: c["id"] in ids for c in categories}
    things = _check_categories([c for c in categories if not is_stuff[c["id"]]], source, 1)
    stuff = _check_categories([c for c in categories if is_stuff[c["id"]]], source, 0)
    if stuff_list is not None:
        both = sorted(set(things) & set(extra))
        if both:
            raise ConversionError(
                f"Category ids {both} are both thing categories (in '{source}') and stuff "
                f"categories (in {stuff_source})."
            )
        renamed = sorted(i for i in set(stuff) & set(extra) if stuff[i]["name"] != extra[i]["name"])
        if renamed:
            raise ConversionError(
                f"Stuff category ids {renamed} have other names in '{source}' than in "
                f"{stuff_source} (e.g. '{stuff[renamed[0]]['name']}' and "
                f"'{extra[renamed[0]]['name']}')."
            )
        stuff.update({i: c for i, c in extra.items() if i not in stuff})
    return things, stuff


def _check_categories(categories, source, isthing):
    max_id = _MAX_SEGMENT_ID // LABEL_DIVISOR - 1
    out = {}
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ConversionError(f"{source}: category {c!r} needs an 'id' and a 'name'.")
        cid = c["id"]
        if not _is_int(cid) or not 1 <= cid <= max_id:
            raise ConversionError(
                f"{source}: category '{c['name']}' has id {cid!r}; ids must be integers in "
                f"[1, {max_id}] (0 is void)."
            )
        if cid in out:
            raise ConversionError(f"{source}: category id {cid} appears twice.")
        if "isthing" in c and int(c["isthing"]) != isthing:
            kind = "instance json" if isthing else "stuff categories"
            raise ConversionError(
                f"{source}: category {cid} ('{c['name']}') has isthing={c['isthing']}, but the "
                f"{kind} hold only {'thing' if isthing else 'stuff'} categories."
            )
        entry = {
            "id": int(cid),
            "name": c["name"],
            "supercategory": c.get("supercategory", c["name"]),
            "isthing": isthing,
        }
        if "color" in c:
            entry["color"] = list(c["color"])
        out[int(cid)] = entry
    return out


def _check_images(images, source):
    out, png_names = {}, {}
    for image in images:
        if not isinstance(image, dict) or "id" not in image:
            raise ConversionError(f"'{source}': image entry {image!r} has no 'id'.")
        image_id = image["id"]
        if image_id in out:
            raise ConversionError(f"'{source}': image id {image_id!r} appears twice.")
        for key in ("width", "height"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                raise ConversionError(
                    f"'{source}': image {image_id!r} has {key}={image.get(key)!r}; a positive "
                    "integer is needed."
                )
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise ConversionError(f"'{source}': image {image_id!r} has no 'file_name'.")
        parts = file_name.replace("\\", "/").split("/")
        if os.path.isabs(file_name) or ".." in parts:
            raise ConversionError(
                f"'{source}': image {image_id!r} has file_name '{file_name}'; it must be a "
                "relative path inside the image folder."
            )
        png_name = os.path.splitext("/".join(parts))[0] + ".png"
        if png_name in png_names:
            raise ConversionError(
                f"'{source}': images {png_names[png_name]!r} and {image_id!r} would both write "
                f"the panoptic PNG '{png_name}'."
            )
        png_names[png_name] = image_id
        out[image_id] = dict(image, _png_name=png_name)
    return out


def _check_annotation(ann, source, images, things, stuff, seen_ids):
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    if not _is_int(ann_id):
        raise ConversionError(
            f"'{source}': annotation {str(ann)[:200]} has id {ann_id!r}; an integer is needed."
        )
    if ann_id in seen_ids:
        raise ConversionError(f"'{source}': annotation id {ann_id!r} appears twice.")
    seen_ids.add(ann_id)
    image_id = ann.get("image_id")
    if image_id not in images:
        raise ConversionError(
            f"'{source}': annotation {ann_id!r} refers to image id {image_id!r}, which is not in "
            "'images'."
        )
    category_id = ann.get("category_id")
    if category_id not in things and category_id not in stuff:
        raise ConversionError(
            f"'{source}': annotation {ann_id!r} (image {image_id!r}) has category_id "
            f"{category_id!r}, which is not among the categories {sorted(things) + sorted(stuff)}."
        )
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ConversionError(
            f"'{source}': annotation {ann_id!r} (image {image_id!r}) has iscrowd="
            f"{ann['iscrowd']!r}; 0 or 1 expected."
        )
    if category_id in stuff and ann.get("iscrowd", 0):
        raise ConversionError(
            f"'{source}': annotation {ann_id!r} (image {image_id!r}) is a crowd of the stuff "
            f"category {category_id}; only things have crowds."
        )


def _decode_segmentation(ann, image, source):
    """The annotation's mask, (H, W) bool. Raises ConversionError on a malformed segmentation."""
    h, w = image["height"], image["width"]
    seg = ann.get("segmentation")
    where = f"'{source}': annotation {ann['id']!r} (image {image['id']!r})"
    if isinstance(seg, list):  # polygons
        if not seg:
            raise ConversionError(f"{where} has an empty polygon list.")
        for poly in seg:
            if (
                not isinstance(poly, list)
                or len(poly) < 6
                or len(poly) % 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)
            ):
                raise ConversionError(
                    f"{where} has a malformed polygon {str(poly)[:120]}: a polygon is a flat list "
                    "of at least 3 (x, y) number pairs."
                )
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:  # RLE
        size = seg["size"]
        if list(size) != [h, w]:
            raise ConversionError(
                f"{where} has an RLE of size {size!r}, but the image is [height, width] = "
                f"[{h}, {w}]."
            )
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise ConversionError(
                    f"{where} has malformed uncompressed RLE counts (they must be non-negative "
                    f"integers summing to height * width = {h * w}; got sum "
                    f"{sum(c for c in counts if isinstance(c, (int, float)))})."
                )
            rle = mask_util.frPyObjects(seg, h, w)
        elif isinstance(counts, (str, bytes)):  # compressed
            rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ConversionError(f"{where} has RLE counts of type {type(counts).__name__}.")
    else:
        raise ConversionError(
            f"{where} has a malformed segmentation {str(seg)[:120]}: expected polygons (list) or "
            "RLE (dict with 'counts' and 'size')."
        )
    try:
        with warnings.catch_warnings():
            # pycocotools' Cython objects lack numpy 2's `copy` keyword; harmless.
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_util.decode(rle)
    except Exception as e:  # pycocotools raises bare exceptions on corrupt strings
        raise ConversionError(f"{where} has an RLE that cannot be decoded: {e}") from e
    if mask.shape != (h, w):
        raise ConversionError(f"{where} decodes to a mask of shape {mask.shape}, not {(h, w)}.")
    return mask.astype(bool)


def _read_semantic(semantic_dir, image, things, stuff):
    path = os.path.join(semantic_dir, image["_png_name"])
    if not os.path.isfile(path):
        raise ConversionError(
            f"Semantic PNG '{path}' for image {image['id']!r} ('{image['file_name']}') is missing."
        )
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ConversionError(
                    f"Semantic PNG '{path}' (image {image['id']!r}) has mode '{im.mode}'; a "
                    "single-channel PNG of category ids is expected."
                )
            if im.size != (image["width"], image["height"]):
                raise ConversionError(
                    f"Semantic PNG '{path}' (image {image['id']!r}) is {im.size[0]}x{im.size[1]} "
                    f"(width x height), but the image is {image['width']}x{image['height']}."
                )
            sem = np.asarray(im).astype(np.int64)
    except OSError as e:  # truncated or not an image: PIL's message may not name the file
        raise ConversionError(
            f"Semantic PNG '{path}' (image {image['id']!r}) cannot be read: {e}"
        ) from e
    unknown = sorted(set(np.unique(sem).tolist()) - set(stuff) - set(things) - {SEMANTIC_VOID})
    if unknown:
        raise ConversionError(
            f"Semantic PNG '{path}' (image {image['id']!r}) holds values {unknown} that are "
            f"neither stuff categories {sorted(stuff)}, thing categories nor void "
            f"({SEMANTIC_VOID})."
        )
    return sem


# ---------------------------------------------------------------------------------------------
# Painting


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _convert_image(image, anns, things, stuff, semantic_dir, report, source):
    """Returns (segments_info, id map (H, W) int64) for one image and updates the report."""
    h, w = image["height"], image["width"]
    image_id = image["id"]
    masks = [_decode_segmentation(ann, image, source) for ann in anns]
    areas = [int(m.sum()) for m in masks]

    # Paint order: stuff first, then crowd, then larger before smaller, then higher id before
    # lower; the last painted wins, so instances beat stuff, non-crowd beats crowd, smaller beats
    # larger, lower id beats higher.
    layer = [2 if a["category_id"] in stuff else int(a.get("iscrowd", 0)) for a in anns]
    order = sorted(range(len(anns)), key=lambda i: (-layer[i], -areas[i], -anns[i]["id"]))
    owner = np.full((h, w), -1, dtype=np.int64)
    cover = np.zeros((h, w), dtype=np.int32)
    for i in order:
        owner[masks[i]] = i
        cover += masks[i]
    overlap = int((cover > 1).sum())
    if overlap:
        report.overlap_pixels[image_id] = overlap

    final_areas = np.bincount(owner[owner >= 0], minlength=len(anns))
    segment_ids = np.zeros(len(anns) + 1, dtype=np.int64)  # index -1 -> 0 (void)
    next_index = {}
    things_info = []
    for i in sorted(range(len(anns)), key=lambda i: anns[i]["id"]):
        ann = anns[i]
        if final_areas[i] == 0:
            covered_by = sorted(
                {anns[j]["id"] for j in np.unique(owner[masks[i]]).tolist() if j >= 0}
            )
            report.dropped.append(
                {
                    "image_id": image_id,
                    "annotation_id": ann["id"],
                    "category_id": ann["category_id"],
                    "reason": "fully covered" if areas[i] else "empty mask",
                    "covered_by": covered_by,
                }
            )
            continue
        if layer[i] == 2:  # stuff: one segment per category, listed below from the id map
            segment_ids[i] = ann["category_id"] * LABEL_DIVISOR
            continue
        k = next_index.get(ann["category_id"], 0) + 1
        if k >= LABEL_DIVISOR:
            raise ConversionError(
                f"'{source}': image {image_id!r} has more than "
                f"{LABEL_DIVISOR - 1} instances of category {ann['category_id']}; segment ids "
                f"category_id * {LABEL_DIVISOR} + k cannot number them."
            )
        next_index[ann["category_id"]] = k
        segment_ids[i] = ann["category_id"] * LABEL_DIVISOR + k
        iscrowd = int(ann.get("iscrowd", 0))
        things_info.append(
            {
                "id": int(segment_ids[i]),
                "category_id": int(ann["category_id"]),
                "iscrowd": iscrowd,
                "bbox": _bbox(owner == i),
                "area": int(final_areas[i]),
            }
        )
        if iscrowd:
            report.num_crowd_segments += 1
        else:
            report.num_thing_segments += 1

    id_map = segment_ids[owner]  # owner -1 picks the trailing 0
    if semantic_dir is not None:
        sem = _read_semantic(semantic_dir, image, things, stuff)
        free = owner < 0
        for category_id in sorted(set(np.unique(sem[free]).tolist()) - {SEMANTIC_VOID}):
            region = free & (sem == category_id)
            if category_id in things:
                report.unassigned_thing_pixels[image_id] = report.unassigned_thing_pixels.get(
                    image_id, 0
                ) + int(region.sum())
                continue
            id_map[region] = category_id * LABEL_DIVISOR
    stuff_info = []
    for segment_id in np.unique(id_map).tolist():
        if segment_id % LABEL_DIVISOR or segment_id // LABEL_DIVISOR not in stuff:
            continue  # void, or a thing/crowd segment
        region = id_map == segment_id
        stuff_info.append(
            {
                "id": segment_id,
                "category_id": segment_id // LABEL_DIVISOR,
                "iscrowd": 0,
                "bbox": _bbox(region),
                "area": int(region.sum()),
            }
        )
        report.num_stuff_segments += 1
    segments_info = sorted(stuff_info + things_info, key=lambda s: s["id"])
    return segments_info, id_map


# ---------------------------------------------------------------------------------------------
# Atomic output


class _AtomicOutput:
    """The PNG folder and the json, renamed into place together on success: the folder by
    :func:`~efficientps_d2.atomic_io.atomic_directory`, then the json by
    :func:`~efficientps_d2.atomic_io.atomic_write` in its ``then`` callback, so that failing to
    write the json puts the previous folder back."""

    def __init__(self, output_json, output_dir, overwrite):
        self.json_path = os.path.abspath(output_json)
        self.dir_path = os.path.abspath(output_dir)
        self.overwrite = overwrite
        self.json_data = None

    def __enter__(self):
        for path in (self.dir_path, self.json_path):  # leftovers of a killed conversion
            remove_stale_temporaries_of(path)
        self._stack = contextlib.ExitStack()
        try:
            directory = atomic_directory(self.dir_path, overwrite=self.overwrite, then=self._commit)
            self.tmp_dir = self._stack.enter_context(directory)
            os.mkdir(self.tmp_dir)
        except BaseException:
            self._stack.close()
            raise
        return self

    def write_png(self, name, rgb):
        path = os.path.join(self.tmp_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rgb).save(path, format="PNG")

    def write_json(self, data):
        """Keeps ``data``; it is written once the PNG folder is in place."""
        self.json_data = data

    def __exit__(self, *exc_info):
        return self._stack.__exit__(*exc_info)

    def _commit(self):
        # Called once the PNG folder is in place; raising puts the previous folder back.
        assert self.json_data is not None, "the json was never written"
        if not self.overwrite and os.path.lexists(self.json_path):
            raise FileExistsError(f"'{self.json_path}' appeared during the conversion.")
        atomic_write(self.json_path, lambda f: json.dump(self.json_data, f), mode="w")


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.tools.convert_instances_to_panoptic",
        description="Convert COCO instance annotations (+ semantic PNGs for stuff) or COCO "
        "panoptic detection format (stuff as annotations, categories with isthing) to COCO "
        "panoptic format. Overlaps: instances over stuff, the smaller instance wins, ties to the "
        f"lower annotation id; semantic PNG void value: {SEMANTIC_VOID}.",
    )
    parser.add_argument(
        "--instances",
        required=True,
        help="COCO instance json, or COCO panoptic detection format json",
    )
    parser.add_argument("--output-json", required=True, help="panoptic json to write")
    parser.add_argument("--output-dir", required=True, help="folder of panoptic PNGs to write")
    parser.add_argument(
        "--semantic-dir",
        help=f"folder of semantic PNGs (stuff category ids, {SEMANTIC_VOID} = void), named like "
        "the images with a .png extension",
    )
    parser.add_argument(
        "--stuff-categories", help='json list of stuff categories [{"id": ..., "name": ...}]'
    )
    parser.add_argument(
        "--things-only",
        action="store_true",
        help="the json's categories (without isthing) are all things; there is no stuff",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--report", help="also write the conversion report to this json file")
    args = parser.parse_args(argv)
    try:
        if args.report:  # checked now: the report comes after the conversion
            inputs = _inputs(args.instances, args.semantic_dir, args.stuff_categories)
            _check_outputs_spare_inputs(args.output_json, args.output_dir, inputs, args.report)
            _check_writable(args.report, what="report")
        report = convert_instances_to_panoptic(
            args.instances,
            args.output_json,
            args.output_dir,
            semantic_dir=args.semantic_dir,
            stuff_categories=args.stuff_categories,
            things_only=args.things_only,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.report:
        atomic_write(
            args.report,
            lambda f: json.dump(report.to_dict(), f, indent=2),
            mode="w",
            remove_stale=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
