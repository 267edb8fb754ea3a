"""Checks a panoptic data set and a config against each other before any work starts.

Faults that Detectron2 and panopticapi only meet late (an 8-bit grayscale panoptic PNG crashes
panopticapi at the end of training; a data set without segments trains to a ZeroDivisionError in
PQ; ``SEM_SEG_HEAD.NUM_CLASSES`` smaller than the data set's classes fails mid-training; an unknown
``DATASETS.TEST`` name fails after training) are found here, with the file, id or key named:

- :func:`check_dataset_names`: every name in ``DATASETS.TRAIN``/``DATASETS.TEST`` is registered
  (otherwise the closest registered names are suggested);
- :func:`check_class_counts`: ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` equals the data set's number of
  classes and ``MODEL.ROI_HEADS.NUM_CLASSES`` its number of thing classes;
- :func:`check_evaluator_types`: every data set in ``DATASETS.TEST`` can be evaluated;
- :func:`check_dataset`: the records of one data set: categories, empty data sets, and with
  ``pngs=True`` every panoptic PNG (mode RGB or RGBA, size of its image, ids present in the PNG
  against ``segments_info`` both ways) and the size (and pixel type) of every image against its
  record, from the image's header;
- :func:`validate_datasets`: all of the above for a config, as ``train_net.py`` runs it. In a
  multi-process run the PNG pass (minutes for Cityscapes) runs once per machine, on its local
  rank 0, and every rank gets the verdict: a fault stops every rank with the same error.

The config is a YAML one or a LazyConfig (``.py``):
:class:`~efficientps_d2.config_adapter.ConfigAdapter` reads the same settings from either, and the
messages name the key of each (``model.sem_seg_head.num_classes``, ...).

From the command line (prints a report, exits 1 on errors)::

    python -m efficientps_d2.data.check synthetic_panoptic_train [--no-pngs] \\
        [--config-file C [--opts KEY VALUE ...]]
"""

import argparse
import difflib
import logging
import os
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import List

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.registry import locate
from PIL import Image

from ..config_adapter import ConfigAdapter
from .image_files import unusable_mode

__all__ = [
    "DataCheckError",
    "DatasetReport",
    "check_class_counts",
    "check_dataset",
    "check_dataset_names",
    "check_evaluator_types",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10  # errors shown in one exception message
_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# PNG text (and im.info) keys that Pillow reads an EXIF orientation from, and its eXIf chunk.
_PNG_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


class DataCheckError(ValueError):
    """A data set, or a config's use of it, is not fit for training or evaluation."""


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found in one data set.

    Attributes:
        name: the data set.
        num_images: number of records.
        num_segments: number of segments over all records.
        class_counts: {contiguous class id: number of segments}.
        class_names: names of the contiguous class ids (``stuff_classes``), when known.
        pngs_checked: number of panoptic PNGs opened and compared with their ``segments_info``.
        panoptic_images: number of records with a panoptic PNG (``pan_seg_file_name``).
        errors: one line per fault, naming the file, id or key.
        seconds: time the check took.
    """

    name: str
    num_images: int = 0
    num_segments: int = 0
    class_counts: Counter = field(default_factory=Counter)
    class_names: List[str] = field(default_factory=list)
    pngs_checked: int = 0
    panoptic_images: int = 0
    errors: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def format(self):
        """The report as text, as the command line prints it."""
        lines = [
            f"Data set '{self.name}': {self.num_images} images, {self.num_segments} segments, "
            f"{self.pngs_checked} panoptic PNGs checked in {self.seconds:.2f} s."
        ]
        for class_id in sorted(set(self.class_counts) | set(range(len(self.class_names)))):
            name = self.class_names[class_id] if class_id < len(self.class_names) else "?"
            lines.append(
                f"  class {class_id:3d} {name:<24s} {self.class_counts[class_id]} segments"
            )
        if self.errors:
            lines.append(f"{len(self.errors)} errors:")
            lines += [f"  {e}" for e in self.errors]
        else:
            lines.append("No errors.")
        return "\n".join(lines)

    def raise_if_errors(self):
        if not self.errors:
            return
        shown = "\n  ".join(self.errors[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(self.errors) - _MAX_LISTED} more"
            if len(self.errors) > _MAX_LISTED
            else ""
        )
        raise DataCheckError(
            f"Data set '{self.name}' has {len(self.errors)} errors:\n  {shown}{more}\n"
            f"(`python -m efficientps_d2.data.check {self.name}` prints the full report.)"
        )


def closest_names(name, choices, n=3):
    """The registered names most like ``name`` (difflib), for 'did you mean' messages."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.4)


def check_dataset_names(cfg):
    """Raises :class:`DataCheckError` for a name in DATASETS.TRAIN or DATASETS.TEST (of a
    LazyConfig: ``dataloader.train.dataset.names``, ``dataloader.test.dataset.names``) that is not
    registered, suggesting the closest registered names. (Evaluation checks the training names
    too: the model reads its class layout from the first training set's metadata.)"""
    config = ConfigAdapter(cfg)
    registered = DatasetCatalog.list()
    for setting in ("train_dataset_names", "test_dataset_names"):
        key, names = config.keys[setting], getattr(config, setting)
        for name in names:
            if name in registered:
                continue
            close = closest_names(name, registered)
            hint = f" Closest registered names: {close}." if close else ""
            raise DataCheckError(
                f"{key} names data set '{name}', which is not registered.{hint} Register custom "
                "data with efficientps_d2.data.register_panoptic_dataset before training."
            )


def check_evaluator_types(cfg):
    """Raises :class:`DataCheckError` for a data set in DATASETS.TEST whose ``evaluator_type``
    EfficientPS's evaluators do not score (``efficientps_d2.evaluation.build_evaluator`` would
    refuse it after training). A LazyConfig's ``dataloader.test.dataset.names`` is checked when
    its ``dataloader.evaluator`` is ``build_dataset_evaluator``, which also takes one data set
    only; another evaluator is the config's own choice."""
    from ..evaluation.build import build_dataset_evaluator, check_evaluable

    config = ConfigAdapter(cfg)
    key, names = config.keys["test_dataset_names"], config.test_dataset_names
    if not config.is_yaml:
        evaluator = cfg.get("dataloader", {}).get("evaluator")
        target = evaluator.get("_target_") if evaluator is not None else None
        if isinstance(target, str):  # a config saved as YAML and loaded again
            target = locate(target)
        if target is not build_dataset_evaluator:
            return
    # A YAML config's data sets are evaluated one by one; a LazyConfig's by one evaluator.
    evaluated = names if config.is_yaml else [names] if names else []
    try:
        for dataset_names in evaluated:
            check_evaluable(dataset_names, key)
    except (ValueError, NotImplementedError) as e:
        raise DataCheckError(str(e)) from e


def _panoptic_classes(meta):
    """(number of classes, sorted thing ids) of "standard" panoptic metadata, or None."""
    stuff_classes = meta.get("stuff_classes", None)
    things = meta.get("thing_dataset_id_to_contiguous_id", None)
    if not stuff_classes or things is None:
        return None
    return len(stuff_classes), sorted(things.values())


def check_class_counts(cfg, *, training=True):
    """Raises :class:`DataCheckError` when a data set's classes do not match the config.

    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` must equal the number of classes (stuff and things) and
    ``MODEL.ROI_HEADS.NUM_CLASSES`` the number of thing classes of every panoptic data set in
    DATASETS.TRAIN (when ``training``) and DATASETS.TEST; ``MODEL.EFFICIENTPS.THING_SEMANTIC_IDS``,
    when given, must have ``ROI_HEADS.NUM_CLASSES`` entries below ``SEM_SEG_HEAD.NUM_CLASSES``,
    and be the thing classes of those data sets; and all of them must number their classes as
    the first training set does (the same class names in the same order, the same things).
    (A LazyConfig's twins: ``model.sem_seg_head.num_classes``, ``model.roi_heads.num_classes``,
    ``model.thing_semantic_ids`` when it is a list.)
    """
    config = ConfigAdapter(cfg)
    num_classes, num_things = config.num_classes, config.num_things
    thing_ids, keys = config.thing_semantic_ids, config.keys
    if thing_ids and (
        len(thing_ids) != num_things or not all(0 <= i < num_classes for i in thing_ids)
    ):
        raise DataCheckError(
            f"{keys['thing_semantic_ids']} {thing_ids} must have {keys['num_things']}={num_things} "
            f"entries in [0, {keys['num_classes']}={num_classes})."
        )
    names = (config.train_dataset_names if training else []) + config.test_dataset_names
    for name in dict.fromkeys(names):
        classes = _panoptic_classes(MetadataCatalog.get(name))
        if classes is None:
            continue
        data_classes, data_things = classes
        for setting, value, expected, what in (
            ("num_classes", num_classes, data_classes, "classes"),
            ("num_things", num_things, len(data_things), "thing classes"),
        ):
            if value != expected:
                raise DataCheckError(
                    f"{keys[setting]} is {value} but data set '{name}' has {expected} {what}; set "
                    f"{config.override(setting, expected)} (too few fails mid-training, "
                    "too many wastes a class)."
                )
        ids = "[" + ",".join(map(str, data_things)) + "]"
        if thing_ids and sorted(set(thing_ids)) != data_things:
            # The mapper would refuse the first thing segment mid-training, blaming the data.
            raise DataCheckError(
                f"{keys['thing_semantic_ids']} is {thing_ids} but the thing classes of data set "
                f"'{name}' are {data_things}; set {config.override('thing_semantic_ids', ids)}"
                f"{' (or [], to read them from the data set)' if config.is_yaml else ''}."
            )
    _check_same_classes(config, names)


def _check_same_classes(config, names):
    """Refuses data sets that number their classes differently from the one the model's class
    layout comes from (the first training set; evaluation reads its thing ids from it too):
    Detectron2 checks that only for instance data sets, so panoptic ones of the same class count
    but another order trained on mixed labels, or were scored with classes mistaken."""
    reference = None
    for name in dict.fromkeys(config.train_dataset_names[:1] + names):
        meta = MetadataCatalog.get(name)
        panoptic = _panoptic_classes(meta)
        if panoptic is None:
            continue
        classes, things = list(meta.stuff_classes), panoptic[1]
        if reference is None:
            reference = (name, classes, things)
            continue
        first, first_classes, first_things = reference
        if (classes, things) == (first_classes, first_things):
            continue
        differ = next(
            (i for i, (a, b) in enumerate(zip(classes, first_classes)) if a != b),
            min(len(classes), len(first_classes)),
        )
        what = (
            f"class {differ} is {first_classes[differ]!r} in '{first}' but "
            f"{classes[differ]!r} in '{name}'"
            if differ < min(len(classes), len(first_classes))
            else f"thing classes {first_things} in '{first}' but {things} in '{name}'"
        )
        raise DataCheckError(
            f"Data sets '{first}' and '{name}' ({config.keys['train_dataset_names']}, "
            f"{config.keys['test_dataset_names']}) number their classes differently: {what}. "
            "A model trained on one would mix up the other's classes; register them with the "
            "same categories."
        )


def _image_header(image_file):
    """((width, height), PIL mode) of an image, the size as Detectron2 reads it (EXIF orientation
    applied), from its header: the pixels are not decoded."""
    with Image.open(image_file) as im:
        (width, height), mode = im.size, im.mode
        orientation = None
        if im.format != "PNG" or _png_has_orientation(im, image_file):
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # a broken EXIF block: Detectron2 ignores it too
                pass
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return (width, height), mode


def _png_has_orientation(im, image_file):
    """Whether a PNG holds what Pillow's ``getexif`` reads an orientation from: an eXIf chunk,
    or a "Raw profile type exif" or XMP text. Those before the pixel data are in ``im.info``;
    later ones only after the whole image is decoded (``getexif`` decodes it for them: 20 ms for
    2048x1024, against 0.02 ms for the header), so the chunks after the pixels are looked for
    here by their headers, the pixel data skipped."""
    if any(key in im.info for key in _PNG_ORIENTATION_KEYS):
        return True
    with open(image_file, "rb") as f:
        f.seek(8)  # the PNG signature
        while True:
            header = f.read(8)
            if len(header) < 8:
                return False  # cut short: Detectron2 would fail to read it anyway
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return False
            if kind == b"eXIf":
                return True
            start = f.read(min(length, 80)) if kind in (b"tEXt", b"zTXt", b"iTXt") else b""
            if start.split(b"\0")[0].decode("latin-1") in _PNG_ORIENTATION_KEYS:
                return True
            f.seek(length - len(start) + 4, os.SEEK_CUR)  # the rest and the CRC


def _check_png(record):
    """(whether the PNG could be opened, list of its faults) for one record's panoptic PNG and,
    where the record gives a width and height, the size of its image; the image's pixel type
    too (both read from its header)."""
    errors = []
    png = record["pan_seg_file_name"]
    try:
        with Image.open(png) as im:
            mode, (width, height) = im.mode, im.size
            # Training, evaluation and panopticapi all read the ids from R, G and B, whatever
            # the alpha; any other mode (palette, grayscale) each of them reads differently.
            if mode not in ("RGB", "RGBA"):
                errors.append(
                    f"Panoptic PNG '{png}' has mode {mode}; COCO panoptic PNGs are RGB "
                    "(id = R + 256 G + 256^2 B; an alpha channel is ignored)."
                )
                return True, errors
            rgb = np.asarray(im if mode == "RGB" else im.convert("RGB"))
    except OSError as e:
        errors.append(f"Panoptic PNG '{png}' cannot be read: {e}")
        return False, errors
    try:
        (image_size, image_mode), image_error = _image_header(record["file_name"]), None
    except OSError as e:
        image_size, image_mode, image_error = None, None, e
    unusable = unusable_mode(image_mode)
    if unusable is not None:  # the mapper would stop training at the first batch holding it
        errors.append(f"Image '{record['file_name']}' cannot be used: {unusable}")
    if "height" in record and "width" in record:
        expected, source = (record["width"], record["height"]), "its record"
        # An image that cannot be read is skipped in training: only its size is checked here.
        if image_size is not None and image_size != tuple(expected):
            # Detectron2's check_image_size would stop training at the first batch holding it.
            errors.append(
                f"Image '{record['file_name']}' is {image_size[0]}x{image_size[1]} (WxH) but its "
                f"record says {expected[0]}x{expected[1]} (the json's width and height)."
            )
    elif image_error is not None:
        errors.append(f"Image '{record['file_name']}' cannot be read: {image_error}")
        return True, errors
    else:
        expected, source = image_size, f"image '{record['file_name']}'"
    if (width, height) != tuple(expected):
        errors.append(
            f"Panoptic PNG '{png}' is {width}x{height} (WxH) but {source} says "
            f"{expected[0]}x{expected[1]}."
        )
    from panopticapi.utils import rgb2id  # optional dependency, as for training

    present = set(np.unique(rgb2id(rgb)).tolist()) - {0}
    listed = {int(s["id"]) for s in record["segments_info"]}
    unlisted, absent = sorted(present - listed), sorted(listed - present)
    if unlisted:
        errors.append(
            f"Panoptic PNG '{png}' has segment ids {unlisted[:_MAX_LISTED]} that its "
            "segments_info does not list (panopticapi refuses such PNGs)."
        )
    if absent:
        errors.append(
            f"segments_info of '{png}' lists segment ids {absent[:_MAX_LISTED]} that the PNG does "
            "not contain."
        )
    return True, errors


def check_dataset(name, *, pngs=True):
    """Checks the records of data set ``name``; returns a :class:`DatasetReport`.

    Loading (``DatasetCatalog.get``) must succeed: a loader's ``AssertionError`` (Detectron2's
    built-in loaders assert, naming no path) raises :class:`DataCheckError` naming the data set
    and the metadata's missing files; other loader errors propagate. Then: at least one
    record and one segment; every segment's ``category_id`` a class of the metadata, ``isthing``
    agreeing with it; with ``pngs``, every panoptic PNG as in :func:`_check_png`. Records without
    ``pan_seg_file_name`` (not a panoptic data set) are only counted.
    """
    start = time.perf_counter()
    report = DatasetReport(name)
    meta = MetadataCatalog.get(name)
    classes = _panoptic_classes(meta)
    if classes is not None:
        report.class_names = list(meta.stuff_classes)
    try:
        records = DatasetCatalog.get(name)
    except AssertionError as e:  # Detectron2's built-in loaders assert, naming no path
        raise DataCheckError(_load_failure(name, meta, e)) from e
    report.num_images = len(records)
    if not records:
        report.errors.append(f"Data set '{name}' has no images.")
    panoptic = any("pan_seg_file_name" in r for r in records)
    for record in records:
        if "pan_seg_file_name" not in record:
            continue
        report.panoptic_images += 1
        segments = record.get("segments_info", [])
        report.num_segments += len(segments)
        for seg in segments:
            category = seg.get("category_id")
            report.class_counts[category] += 1
            if classes is None:
                continue
            num_classes, things = classes
            if not isinstance(category, int) or not 0 <= category < num_classes:
                report.errors.append(
                    f"Segment {seg.get('id')} of '{record['pan_seg_file_name']}' has category_id "
                    f"{category!r}, not a class of data set '{name}' (0..{num_classes - 1})."
                )
            elif bool(seg.get("isthing", category in things)) != (category in things):
                report.errors.append(
                    f"Segment {seg.get('id')} of '{record['pan_seg_file_name']}' has isthing="
                    f"{seg.get('isthing')} but class {category} ('{meta.stuff_classes[category]}') "
                    f"is {'a thing' if category in things else 'stuff'}."
                )
    if pngs:
        for record in records:
            if "pan_seg_file_name" in record:
                opened, errors = _check_png(record)
                report.pngs_checked += opened
                report.errors += errors
    if panoptic and records and report.num_segments == 0:
        report.errors.append(
            f"Data set '{name}' has no segments at all: every segments_info is empty "
            f"(panoptic json: {meta.get('panoptic_json', '?')}). Nothing can be learnt or scored."
        )
    report.seconds = time.perf_counter() - start
    return report


def _load_failure(name, meta, error):
    """What is known about a loader's assertion: the files of the metadata that are missing, and
    where Detectron2 looks for its built-in data sets."""
    message = f"{str(error).rstrip('.') or type(error).__name__} (loading data set '{name}')"
    paths = [(k, meta.get(k)) for k in ("panoptic_json", "panoptic_root", "image_root")]
    missing = [(k, p) for k, p in paths if p and not os.path.exists(p)]
    if missing:
        message += ". Missing: " + ", ".join(f"{k} '{p}'" for k, p in missing)
    elif "labelTrainIds" in str(error) and "." in str(meta.get("image_root", "")):
        # Detectron2 derives the labelTrainIds path with .split(".")[0] on the whole path.
        message += (
            f". Detectron2's Cityscapes loader cuts the file paths at their first '.', and the "
            f"images are under '{meta.image_root}': use a path without '.' (e.g. a link to the "
            "data set folder)"
        )
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return message + (
        f". Detectron2's built-in data sets are read under $DETECTRON2_DATASETS ('{root}' here)."
    )


def validate_datasets(cfg, *, training=True):
    """Everything this module checks, for the data sets a config trains on and evaluates on.

    Raises :class:`DataCheckError` at the first fault; returns the :class:`DatasetReport` of each
    data set. Panoptic PNGs are opened when ``DATASETS.CHECK_PNGS`` (a LazyConfig's
    ``train.check_pngs``, default True) is True. ``cfg`` is a YAML or a LazyConfig config.

    Every process of a multi-process run calls it: each checks the config and the json, but only
    the local rank 0 of each machine opens the PNGs (each machine reads its own files); the
    verdicts are then gathered (``comm.all_gather``), so that every rank raises the same error,
    or returns the same reports, and none waits for a rank that stopped.
    """
    config = ConfigAdapter(cfg)
    if training and not config.train_dataset_names:
        # Detectron2's loader asserted "AssertionError: ()" after the model was built.
        raise DataCheckError(
            f"{config.keys['train_dataset_names']} names no data set: training needs one."
        )
    check_dataset_names(cfg)  # the config and the registered names: the same on every rank
    check_class_counts(cfg, training=training)
    check_evaluator_types(cfg)
    train_names = config.train_dataset_names if training else []
    names = train_names + config.test_dataset_names
    read_pngs = config.check_pngs and comm.get_local_rank() == 0
    reports = []
    for name in dict.fromkeys(names):
        report = _check_on_every_rank(name, pngs=read_pngs)
        report.raise_if_errors()
        if name in train_names and report.panoptic_images < report.num_images:
            # The dataset mapper would stop at the first batch that drew one.
            raise DataCheckError(
                f"{config.keys['train_dataset_names']} names data set '{name}', whose "
                f"{report.num_images - report.panoptic_images} of {report.num_images} records "
                "have no panoptic annotation (pan_seg_file_name): EfficientPS trains on panoptic "
                "data (register yours with efficientps_d2.data.register_panoptic_dataset)."
            )
        shared = " (read on local rank 0)" if comm.get_world_size() > 1 else ""
        logger.info(
            f"Checked data set '{name}': {report.num_images} images, {report.num_segments} "
            f"segments, {report.pngs_checked} panoptic PNGs{shared} in {report.seconds:.2f} s."
        )
        reports.append(report)
    return reports


def _check_on_every_rank(name, *, pngs):
    """:func:`check_dataset` on this rank, then, in a multi-process run, the faults found on all
    ranks merged into its report (PNGs counted as on the ranks that read them). An exception on
    any rank (a loader error) is raised on every rank: as itself where it happened, as a
    :class:`DataCheckError` naming that rank and the error elsewhere."""
    if comm.get_world_size() == 1:
        return check_dataset(name, pngs=pngs)
    report, failure = DatasetReport(name), None
    try:
        report = check_dataset(name, pngs=pngs)
    except Exception as e:  # shared below, so that no rank waits for this one in all_gather
        failure = e
    verdicts = comm.all_gather(
        (
            comm.get_rank(),
            report.errors,
            report.pngs_checked,
            None if failure is None else repr(failure),
        )
    )
    if failure is not None:
        raise failure
    for rank, _, _, error in verdicts:
        if error is not None:
            raise DataCheckError(f"Data set '{name}' could not be checked on rank {rank}: {error}")
    report.errors = list(dict.fromkeys(e for _, errors, _, _ in verdicts for e in errors))
    report.pngs_checked = max(count for _, _, count, _ in verdicts)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.data.check",
        description="Check panoptic data sets (and a config's use of them) before training.",
    )
    parser.add_argument("names", nargs="+", metavar="DATASET_NAME", help="registered data sets")
    parser.add_argument("--config-file", help="also check this config's class counts and names")
    parser.add_argument("--no-pngs", action="store_true", help="check the json only")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides (last): KEY VALUE pairs (YAML) or key=value (.py)",
    )
    args = parser.parse_args(argv)

    import efficientps_d2  # noqa: F401  (registers the built-in data sets)

    ok = True
    if args.config_file:
        from ..engine.lazy_config import load_config  # imports the config: not at the top

        # YAML or LazyConfig (.py); a LazyConfig may register its own data sets (README, "Data").
        cfg = load_config(args.config_file, args.opts)
        try:
            check_dataset_names(cfg)
            check_class_counts(cfg)
            print(f"Config '{args.config_file}': data set names and class counts fit.")
        except DataCheckError as e:
            print(f"Config '{args.config_file}': {e}")
            ok = False
    registered = DatasetCatalog.list()
    for name in args.names:
        if name not in registered:
            print(
                f"Data set '{name}' is not registered; closest: {closest_names(name, registered)}"
            )
            ok = False
            continue
        try:
            report = check_dataset(name, pngs=not args.no_pngs)
        except (OSError, ValueError) as e:  # the loader's own checks
            print(f"Data set '{name}' cannot be loaded: {e}")
            ok = False
            continue
        print(report.format())
        ok = ok and not report.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
