"""Built-in synthetic panoptic data: writing the data set, its Detectron2 registration and CLI.

The classes and the drawing of one image are in :mod:`efficientps_d2.data.synthetic_drawing`;
here the images are written as a data set (under a lock) and registered with Detectron2.

Layout under ``<root>/synthetic_panoptic/`` (``<root>`` defaults to ``$DETECTRON2_DATASETS`` or
``datasets``), in COCO panoptic format::

    images/{train,val}/<split>_<id>.jpg      RGB images
    panoptic_{train,val}/<split>_<id>.png    segment ids, id = R + 256 * G + 256**2 * B (0 = void)
    panoptic_{train,val}.json                images, annotations (segments_info), categories
    instances_{train,val}.json               COCO instance annotations (RLE masks) of the things

Importing this module registers ``synthetic_panoptic_train`` and ``synthetic_panoptic_val``; the
files are generated on first use (``DatasetCatalog.get``) when they do not exist yet. To generate
them explicitly::

    python -m efficientps_d2.tools.generate_synthetic_data --root datasets --num-train 200
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import time

import numpy as np
from detectron2.data import DatasetCatalog
from PIL import Image

from ..atomic_io import atomic_directory, remove_stale_temporaries
from .coco_panoptic import register_panoptic_dataset
from .synthetic_drawing import SYNTHETIC_CATEGORIES, THING_IDS, render_sample

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "generate_synthetic_panoptic",
    "ensure_synthetic_panoptic",
    "register_synthetic",
    "render_sample",
]

logger = logging.getLogger(__name__)

DIRNAME = "synthetic_panoptic"
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 200, "val": 50}
DEFAULT_SIZE = (128, 192)  # (height, width)
DEFAULT_SEED = 0


# -------------------------------------------------------------------------------------------------
# Writing a data set
# -------------------------------------------------------------------------------------------------
def _write_split(data_dir, split, num_images, size, seed):
    """Writes one split's images, panoptic PNGs and both jsons under ``data_dir``."""
    from panopticapi.utils import id2rgb
    from pycocotools import mask as mask_utils

    height, width = size
    image_dir = os.path.join(data_dir, "images", split)
    panoptic_dir = os.path.join(data_dir, f"panoptic_{split}")
    os.makedirs(image_dir)
    os.makedirs(panoptic_dir)
    images, pan_annotations, instance_annotations = [], [], []
    for index in range(num_images):
        image_id = index + 1
        # One independent stream per (seed, split, image): any image is reproducible on its own and
        # the val images do not depend on how many train images were asked for.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, segment_ids, segments = render_sample(rng, height, width)
        stem = f"{split}_{image_id:06d}"
        Image.fromarray(image).save(os.path.join(image_dir, stem + ".jpg"), quality=92)
        Image.fromarray(id2rgb(segment_ids)).save(os.path.join(panoptic_dir, stem + ".png"))
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
        )
        pan_annotations.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
        )
        for segment in segments:
            if segment["category_id"] not in THING_IDS:
                continue
            rle = mask_utils.encode(
                np.asfortranarray((segment_ids == segment["id"]).astype(np.uint8))
            )
            instance_annotations.append(
                {
                    "id": len(instance_annotations) + 1,
                    "image_id": image_id,
                    "category_id": segment["category_id"],
                    "segmentation": {
                        "size": [height, width],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "area": segment["area"],
                    "bbox": segment["bbox"],
                    "iscrowd": 0,
                }
            )
    info = {
        "description": "efficientps_d2 synthetic panoptic data",
        "split": split,
        "seed": seed,
        "height": height,
        "width": width,
    }
    panoptic = {
        "info": info,
        "images": images,
        "annotations": pan_annotations,
        "categories": SYNTHETIC_CATEGORIES,
    }
    instances = {
        "info": info,
        "images": images,
        "annotations": instance_annotations,
        "categories": [c for c in SYNTHETIC_CATEGORIES if c["isthing"]],
    }
    for prefix, content in (("panoptic", panoptic), ("instances", instances)):
        with open(os.path.join(data_dir, f"{prefix}_{split}.json"), "w") as f:
            json.dump(content, f)


def _check_arguments(num_train, num_val, size, seed):
    for key, value in (("num_train", num_train), ("num_val", num_val)):
        if int(value) < 1:
            raise ValueError(f"{key} must be at least 1, got {value}.")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width), each at least 32 pixels; got {size}.")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")


def generate_synthetic_panoptic(
    out_dir,
    *,
    num_train=DEFAULT_NUM_IMAGES["train"],
    num_val=DEFAULT_NUM_IMAGES["val"],
    size=DEFAULT_SIZE,
    seed=DEFAULT_SEED,
):
    """Writes the whole data set (both splits) into the folder ``out_dir``, which must not exist.

    Not atomic by itself; :func:`ensure_synthetic_panoptic` writes through a temporary folder.
    The output is a deterministic function of the arguments (byte-identical labels and jsons).
    """
    _check_arguments(num_train, num_val, size, seed)
    os.makedirs(out_dir)
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(out_dir, split, int(count), (int(size[0]), int(size[1])), int(seed))


def _split_files(data_dir, split):
    return {
        "image_root": os.path.join(data_dir, "images", split),
        "panoptic_root": os.path.join(data_dir, f"panoptic_{split}"),
        "panoptic_json": os.path.join(data_dir, f"panoptic_{split}.json"),
        "instances_json": os.path.join(data_dir, f"instances_{split}.json"),
    }


def _is_complete(data_dir):
    return all(
        os.path.isfile(files[key])
        for split in SPLITS
        for files in [_split_files(data_dir, split)]
        for key in ("panoptic_json", "instances_json")
    )


@contextlib.contextmanager
def _generation_lock(root):
    """Serialises generation between processes (e.g. one per GPU) where the OS has ``flock``."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename race below is tolerated instead
        yield False
        return
    with open(os.path.join(root, f".{DIRNAME}-lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_synthetic_panoptic(
    root=None,
    *,
    num_train=DEFAULT_NUM_IMAGES["train"],
    num_val=DEFAULT_NUM_IMAGES["val"],
    size=DEFAULT_SIZE,
    seed=DEFAULT_SEED,
    overwrite=False,
):
    """Makes sure ``<root>/synthetic_panoptic`` holds a complete data set; returns its path.

    An existing complete data set is kept as it is (whatever arguments made it) unless
    ``overwrite``. Generation writes into a temporary folder next to the final one and renames it
    into place, so an interrupted run never leaves a folder that looks complete; concurrent callers
    wait on a lock file, and a lost rename race is harmless (the winner's data is identical).

    Args:
        root: parent folder; ``$DETECTRON2_DATASETS`` or "datasets" when None.
        num_train, num_val: number of images of each split.
        size: (height, width) of every image.
        seed: seed of the generator.
        overwrite: regenerate even if a data set exists.
    Returns:
        str: the data set folder.
    """
    root = _resolve_root(root)
    data_dir = os.path.join(root, DIRNAME)
    if _is_complete(data_dir) and not overwrite:
        return data_dir
    _check_arguments(num_train, num_val, size, seed)
    os.makedirs(root, exist_ok=True)
    with _generation_lock(root) as locked:
        if _is_complete(data_dir) and not overwrite:
            return data_dir  # made by another process while we waited
        if os.path.exists(data_dir) and not overwrite:
            raise RuntimeError(
                f"'{data_dir}' exists but is not a complete synthetic data set (its json files "
                "are missing); delete it to have it generated again."
            )
        if locked:  # no live generator can own a temporary folder: they all take the lock
            remove_stale_temporaries(root, target=DIRNAME)
        start = time.perf_counter()
        try:
            with atomic_directory(data_dir, overwrite=overwrite) as out_dir:
                generate_synthetic_panoptic(
                    out_dir, num_train=num_train, num_val=num_val, size=size, seed=seed
                )
        except OSError:
            if not _is_complete(data_dir):
                raise
            # Lost a race against a process without the lock; its data is the same.
    logger.info(
        f"Generated the synthetic panoptic data set ({num_train} train + {num_val} val images of "
        f"{size[0]}x{size[1]}, seed {seed}) in '{data_dir}' in {time.perf_counter() - start:.1f} s."
    )
    return data_dir


# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------
def _resolve_root(root):
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(str(root))


def _generate_then_load(loader, root, generate_kwargs):
    ensure_synthetic_panoptic(root, **generate_kwargs)
    return loader()


def register_synthetic(root=None, *, prefix=DIRNAME, **generate_kwargs):
    """Registers ``<prefix>_train`` and ``<prefix>_val``, generated under ``root`` on first use.

    Args:
        root: parent of the ``synthetic_panoptic`` folder; ``$DETECTRON2_DATASETS`` (read now) or
            "datasets" when None.
        prefix: name prefix of the two data sets.
        generate_kwargs: num_train, num_val, size, seed, passed to
            :func:`ensure_synthetic_panoptic` when the data does not exist yet.
    Returns:
        list[str]: the registered names.
    """
    root = _resolve_root(root)
    data_dir = os.path.join(root, DIRNAME)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        files = _split_files(data_dir, split)
        register_panoptic_dataset(name, categories=SYNTHETIC_CATEGORIES, **files)
        # Wrap the loader that registration installed so that the files exist before it runs.
        loader = DatasetCatalog[name]
        DatasetCatalog.remove(name)
        DatasetCatalog.register(
            name, functools.partial(_generate_then_load, loader, root, dict(generate_kwargs))
        )
        names.append(name)
    return names


if f"{DIRNAME}_train" not in DatasetCatalog.list():  # re-imports (e.g. `python -m`) are no-ops
    register_synthetic()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m efficientps_d2.tools.generate_synthetic_data",
        description="Generate the synthetic panoptic data set.",
    )
    parser.add_argument(
        "--root", default=None, help="parent folder (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_IMAGES["train"])
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_IMAGES["val"])
    parser.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    args = parser.parse_args(argv)
    data_dir = os.path.join(_resolve_root(args.root), DIRNAME)
    if _is_complete(data_dir) and not args.overwrite:
        print(f"'{data_dir}' already exists; pass --overwrite to generate it again.")
        return data_dir
    start = time.perf_counter()
    ensure_synthetic_panoptic(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        size=tuple(args.size),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"Wrote {args.num_train} train + {args.num_val} val images of "
        f"{args.size[0]}x{args.size[1]} to '{data_dir}' in {time.perf_counter() - start:.1f} s."
    )
    return data_dir


if __name__ == "__main__":
    main()
