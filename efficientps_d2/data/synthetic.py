"""Built-in synthetic panoptic data: a deterministic generator and its Detectron2 registration.

The data set is small enough to train a tiny EfficientPS on a CPU, yet exercises everything a
panoptic model must get right:

- three **stuff** classes with their own textures and irregular boundaries: ``sky`` (a smooth
  vertical gradient with soft clouds, above a hilly horizon), ``ground`` (grainy, mottled green to
  brown) and ``water`` (bluish, with horizontal ripples; sky-like colours, so texture matters);
- three **thing** classes told apart by *shape only*: ``disc``, ``rectangle`` (any aspect ratio and
  rotation) and ``triangle``; every instance takes its colour from one shared palette, with
  shading, so colour gives no hint of the class;
- 2 to 8 instances an image, from small (about 12 px across at 128x192) to large (about 80 px),
  anywhere in the image, including instances of the same class that touch or overlap; the order of
  drawing decides which instance owns a pixel, and instances left with too few visible pixels are
  dropped (and not drawn).

Layout under ``<root>/synthetic_panoptic/`` (``<root>`` defaults to ``$DETECTRON2_DATASETS`` or
``datasets``), in COCO panoptic format::

    images/{train,val}/<split>_<id>.jpg      RGB images
    panoptic_{train,val}/<split>_<id>.png    segment ids, id = R + 256 * G + 256**2 * B (0 = void)
    panoptic_{train,val}.json                images, annotations (segments_info), categories
    instances_{train,val}.json               COCO instance annotations (RLE masks) of the things

Category dataset ids are deliberately neither contiguous nor things-first (stuff 1-3, things 5-7):
code that confuses dataset ids with contiguous ids fails on this data.

Importing this module registers ``synthetic_panoptic_train`` and ``synthetic_panoptic_val``; the
files are generated on first use (``DatasetCatalog.get``) when they do not exist yet. To generate
them explicitly::

    python -m efficientps_d2.data.synthetic --root datasets --num-train 200 --num-val 50
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time

import cv2
import numpy as np
from detectron2.data import DatasetCatalog
from PIL import Image

from .custom import register_panoptic_dataset

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "generate_synthetic_panoptic",
    "ensure_synthetic_panoptic",
    "register_synthetic",
    "render_sample",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "sky", "isthing": 0, "color": [70, 130, 180], "supercategory": "stuff"},
    {"id": 2, "name": "ground", "isthing": 0, "color": [110, 160, 60], "supercategory": "stuff"},
    {"id": 3, "name": "water", "isthing": 0, "color": [30, 60, 140], "supercategory": "stuff"},
    {"id": 5, "name": "disc", "isthing": 1, "color": [220, 50, 50], "supercategory": "shape"},
    {"id": 6, "name": "rectangle", "isthing": 1, "color": [240, 200, 40], "supercategory": "shape"},
    {"id": 7, "name": "triangle", "isthing": 1, "color": [190, 60, 200], "supercategory": "shape"},
]
_SKY, _GROUND, _WATER, _DISC, _RECTANGLE, _TRIANGLE = (c["id"] for c in SYNTHETIC_CATEGORIES)
_STUFF_IDS = (_SKY, _GROUND, _WATER)
_THING_IDS = (_DISC, _RECTANGLE, _TRIANGLE)

# Shared by every thing class, and chosen away from the stuff colours so that objects stand out.
_PALETTE = np.array(
    [
        [205, 45, 40],  # red
        [240, 150, 40],  # orange
        [240, 220, 60],  # yellow
        [210, 60, 190],  # magenta
        [120, 70, 200],  # violet
        [235, 235, 230],  # white
        [45, 45, 50],  # charcoal
        [245, 160, 175],  # pink
    ],
    dtype=np.float32,
)

DIRNAME = "synthetic_panoptic"
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 200, "val": 50}
DEFAULT_SIZE = (128, 192)  # (height, width)
DEFAULT_SEED = 0
_TMP_PREFIX = f".{DIRNAME}.tmp-"
# Temp folders older than this, found while holding the lock, are leftovers of killed runs.
_STALE_TMP_SECONDS = 600


# -------------------------------------------------------------------------------------------------
# Rendering one sample
# -------------------------------------------------------------------------------------------------
def _noise(rng, height, width, cells, octaves=1):
    """Smooth noise, float32 (height, width), zero mean and unit variance.

    Bicubic upsampling of a random grid of about ``cells`` (rows, cols), plus finer octaves at
    halved amplitude (fractal noise) so that thresholded boundaries are irregular at every scale.
    """
    out = np.zeros((height, width), np.float32)
    rows, cols, amplitude = cells[0], cells[1], 1.0
    for _ in range(octaves):
        # Two extra grid cells on each side keep bicubic edge effects out of the crop we keep.
        grid = rng.standard_normal((rows + 4, cols + 4)).astype(np.float32)
        big_h, big_w = height * (rows + 4) // rows, width * (cols + 4) // cols
        big = cv2.resize(grid, (big_w, big_h), interpolation=cv2.INTER_CUBIC)
        y0, x0 = (big_h - height) // 2, (big_w - width) // 2
        out += amplitude * big[y0 : y0 + height, x0 : x0 + width]
        rows, cols, amplitude = rows * 2, cols * 2, amplitude * 0.5
    return (out - out.mean()) / (out.std() + 1e-6)


def _merge_small_regions(labels, min_area):
    """Gives each connected region smaller than ``min_area`` to the class surrounding it most.

    Args:
        labels: int (H, W) stuff map, modified in place.
    """
    kernel = np.ones((3, 3), np.uint8)
    for value in np.unique(labels):
        count, comps, stats, _ = cv2.connectedComponentsWithStats(
            (labels == value).astype(np.uint8), connectivity=4
        )
        for comp in range(1, count):
            if stats[comp, cv2.CC_STAT_AREA] >= min_area:
                continue
            region = comps == comp
            ring = (cv2.dilate(region.astype(np.uint8), kernel) > 0) & ~region
            neighbours = labels[ring]
            neighbours = neighbours[neighbours != value]
            if neighbours.size:
                labels[region] = np.bincount(neighbours).argmax()


def _stuff_layout(rng, height, width):
    """Stuff category id of every pixel, int32 (H, W): sky above a hilly horizon, then a
    ground/water partition from thresholded fractal noise (water may be absent)."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    labels = np.full((height, width), _GROUND, np.int32)
    if rng.random() < 0.9:
        hills = _noise(rng, 1, width, (1, int(rng.integers(2, 5))), octaves=3)[0]
        horizon = rng.uniform(0.2, 0.5) * height + rng.uniform(0.04, 0.12) * height * hills
        labels[yy < horizon[None, :]] = _SKY
    if rng.random() < 0.8:
        # A bias towards the bottom of the image makes water lie in front of the ground more often.
        field = _noise(rng, height, width, (2, 3), octaves=4) + rng.uniform(0.0, 1.5) * yy / height
        below = labels != _SKY
        if below.any():
            threshold = np.quantile(field[below], 1.0 - rng.uniform(0.25, 0.65))
            labels[below & (field > threshold)] = _WATER
    # Tiny stuff fragments would only be void after fusion and an unfair miss for the metric.
    _merge_small_regions(labels, min_area=int(0.012 * height * width))
    return labels


def _stuff_textures(rng, height, width):
    """RGB float32 (H, W, 3) texture of each stuff category id, with per-image colour jitter."""
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    scale = height / 128.0

    sky_top = np.array([80, 130, 205], np.float32) + rng.normal(0, 12, 3)
    sky_low = np.array([170, 200, 235], np.float32) + rng.normal(0, 10, 3)
    sky = sky_top + (sky_low - sky_top) * np.clip(yy * rng.uniform(1.2, 2.2), 0, 1)
    clouds = np.clip(_noise(rng, height, width, (2, 4), octaves=3) - rng.uniform(0.3, 1.2), 0, 1)
    sky = sky + (np.float32(245) - sky) * (rng.uniform(0.5, 0.9) * clouds)[..., None]

    mix = rng.random()
    ground_base = (1 - mix) * np.array([90, 135, 55], np.float32) + mix * np.array(
        [145, 115, 70], np.float32
    )
    ground_base = ground_base + rng.normal(0, 10, 3)
    grain = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (3, 3), 0.7)
    mottle = _noise(rng, height, width, (6, 9), octaves=2)
    ground = ground_base * (1 + 0.22 * grain + 0.12 * mottle)[..., None]

    mix = rng.random()
    water_base = (1 - mix) * np.array([45, 85, 160], np.float32) + mix * np.array(
        [35, 120, 135], np.float32
    )
    water_base = water_base + rng.normal(0, 10, 3)
    period = rng.uniform(3.5, 7.0) * scale
    warp = _noise(rng, height, width, (3, 2), octaves=2)
    ripples = np.sin(2 * np.pi * np.arange(height, dtype=np.float32)[:, None] / period + 1.5 * warp)
    water = water_base * (1 + 0.16 * ripples + 0.05 * mottle)[..., None]
    return {_SKY: sky, _GROUND: ground, _WATER: water}


def _shape_mask(rng, kind, cx, cy, r, height, width):
    """Rasterises one thing; returns its uint8 (H, W) mask and its area before clipping to the
    image (the reference for how much of it must stay visible)."""
    mask = np.zeros((height, width), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    sub = 16  # cv2's fixed-point shift of 4 bits: sub-pixel vertices, smoother small shapes
    if kind == _DISC:
        aspect = rng.uniform(0.88, 1.12)
        axes = (r * aspect, r / aspect)
        cv2.ellipse(
            mask,
            (int(round(cx * sub)), int(round(cy * sub))),
            (int(round(axes[0] * sub)), int(round(axes[1] * sub))),
            float(np.degrees(angle)),
            0,
            360,
            1,
            -1,
            cv2.LINE_8,
            4,
        )
        return mask, np.pi * axes[0] * axes[1]
    if kind == _RECTANGLE:
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        half_w, half_h = 0.85 * r * np.sqrt(aspect), 0.85 * r / np.sqrt(aspect)
        corners = np.array(
            [[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]]
        )
    else:
        # Roughly equilateral: jittered corner angles and radii, never close to a degenerate sliver.
        angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        radii = 1.15 * r * rng.uniform(0.85, 1.15, 3)
        corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = corners @ rotation.T + np.array([cx, cy])
    cv2.fillPoly(mask, [np.round(points * sub).astype(np.int32)], 1, cv2.LINE_8, 4)
    x, y = corners[:, 0], corners[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return mask, area


def _place_things(rng, height, width):
    """Random things in drawing order: dicts with category_id, mask (bool (H, W), unclipped by
    occlusion), area (before clipping) and color."""
    short = min(height, width)
    things = []
    for i in range(int(rng.integers(2, 9))):
        if i > 0 and rng.random() < 0.2:
            # A touching or overlapping neighbour of the same class: the hard case for instances.
            partner = things[int(rng.integers(len(things)))]
            kind, (px, py, pr) = partner["category_id"], partner["geometry"]
            r = pr * rng.uniform(0.7, 1.3)
            direction = rng.uniform(0, 2 * np.pi)
            distance = (pr + r) * rng.uniform(0.55, 0.95)
            cx, cy = px + distance * np.cos(direction), py + distance * np.sin(direction)
            # A different colour than the partner's: two touching twins would be unresolvable.
            choices = [k for k in range(len(_PALETTE)) if k != partner["color_index"]]
            color_index = choices[int(rng.integers(len(choices)))]
        else:
            kind = _THING_IDS[int(rng.integers(len(_THING_IDS)))]
            r = short * np.exp(rng.uniform(np.log(0.06), np.log(0.3)))
            cx, cy = rng.uniform(0.02, 0.98) * width, rng.uniform(0.02, 0.98) * height
            color_index = int(rng.integers(len(_PALETTE)))
        mask, area = _shape_mask(rng, kind, cx, cy, r, height, width)
        things.append(
            {
                "category_id": kind,
                "geometry": (cx, cy, r),
                "mask": mask.astype(bool),
                "area": area,
                "color_index": color_index,
                # Shading: a linear ramp in a random direction, and a per-instance colour jitter.
                "color": _PALETTE[color_index] + rng.normal(0, 10, 3).astype(np.float32),
                "shade": (rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3)),
            }
        )
    return things


def _visible_things(things, height, width):
    """Keeps the things with enough visible pixels once later ones are drawn over earlier ones.

    Returns (kept things, int (H, W) owner map: index into kept things, -1 for stuff)."""
    min_pixels = max(16, int(0.0015 * height * width))

    def owner_map(kept):
        owner = np.full((height, width), -1, np.int32)
        for index, thing in enumerate(kept):
            owner[thing["mask"]] = index
        return owner

    owner = owner_map(things)
    visible = np.bincount(owner.ravel() + 1, minlength=len(things) + 1)[1:]
    kept = [t for v, t in zip(visible, things) if v >= min_pixels and v >= 0.3 * t["area"]]
    if len(kept) < len(things):
        # Dropping a thing only uncovers pixels of the others, so every kept one stays visible.
        owner = owner_map(kept)
    return kept, owner


def render_sample(rng, height, width):
    """Renders one synthetic image with its panoptic annotation.

    Args:
        rng: a ``numpy.random.Generator``; the output is a deterministic function of its state.
        height, width: image size.
    Returns:
        image: uint8 (H, W, 3) RGB.
        segment_ids: int32 (H, W), 0 nowhere (the data has no void), else a segment id.
        segments: list of dicts with id, category_id (dataset id), iscrowd (0), area, bbox
            ([x, y, w, h]), in the order stuff (by category) then things (in drawing order).
    """
    stuff = _stuff_layout(rng, height, width)
    textures = _stuff_textures(rng, height, width)
    image = np.zeros((height, width, 3), np.float32)
    for category_id, texture in textures.items():
        image[stuff == category_id] = texture[stuff == category_id]

    things, owner = _visible_things(_place_things(rng, height, width), height, width)
    xx, yy = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    fine = rng.normal(0, 0.04, (height, width)).astype(np.float32)
    for index, thing in enumerate(things):
        region = owner == index
        cx, cy, r = thing["geometry"]
        direction, strength = thing["shade"]
        ramp = ((xx - cx) * np.cos(direction) + (yy - cy) * np.sin(direction)) / max(r, 1.0)
        factor = 1 + strength * np.clip(ramp, -1, 1) + fine
        image[region] = thing["color"] * factor[region][:, None]

    # Global photometric jitter, sensor noise and a slight blur, as a camera would add.
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    image = image + rng.normal(0, 3.0, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.5)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # Random 24-bit segment ids (never 0 = void, never 0xFFFFFF) exercise all three PNG channels.
    present_stuff = [c for c in _STUFF_IDS if np.any((stuff == c) & (owner < 0))]
    count = len(present_stuff) + len(things)
    ids = (rng.choice(2**24 - 2, size=count, replace=False) + 1).astype(np.int64)
    segment_ids = np.zeros((height, width), np.int32)
    segments = []
    regions = [(c, (stuff == c) & (owner < 0)) for c in present_stuff]
    regions += [(t["category_id"], owner == i) for i, t in enumerate(things)]
    for segment_id, (category_id, region) in zip(ids, regions):
        segment_ids[region] = segment_id
        rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
        segments.append(
            {
                "id": int(segment_id),
                "category_id": int(category_id),
                "iscrowd": 0,
                "bbox": [
                    int(cols[0]),
                    int(rows[0]),
                    int(cols[-1] - cols[0] + 1),
                    int(rows[-1] - rows[0] + 1),
                ],
                "area": int(region.sum()),
            }
        )
    return image, segment_ids, segments


def id_to_rgb(segment_ids):
    """COCO panoptic encoding: int (H, W) ids -> uint8 (H, W, 3) with id = R + 256 G + 256^2 B."""
    segment_ids = np.asarray(segment_ids, np.int64)
    return np.stack([(segment_ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(
        np.uint8
    )


# -------------------------------------------------------------------------------------------------
# Writing a data set
# -------------------------------------------------------------------------------------------------
def _write_split(data_dir, split, num_images, size, seed):
    """Writes one split's images, panoptic PNGs and both jsons under ``data_dir``."""
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
        Image.fromarray(id_to_rgb(segment_ids)).save(os.path.join(panoptic_dir, stem + ".png"))
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
        )
        pan_annotations.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
        )
        for segment in segments:
            if segment["category_id"] not in _THING_IDS:
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
    with open(os.path.join(root, f".{DIRNAME}.lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_tmp_dirs(root):
    # Only called under the lock: whoever wrote these is gone (or hung for minutes).
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(_TMP_PREFIX) and os.path.isdir(path):
            if now - os.path.getmtime(path) > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


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
        if locked:
            _remove_stale_tmp_dirs(root)
        start = time.perf_counter()
        tmp_dir = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root)
        try:
            out_dir = os.path.join(tmp_dir, DIRNAME)
            generate_synthetic_panoptic(
                out_dir, num_train=num_train, num_val=num_val, size=size, seed=seed
            )
            if os.path.exists(data_dir):  # overwrite: move the old set aside, then swap
                os.rename(data_dir, os.path.join(tmp_dir, "old"))
            try:
                os.rename(out_dir, data_dir)
            except OSError:
                if not _is_complete(data_dir):
                    raise
                # Lost a race against a process without the lock; its data is the same.
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
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
    parser = argparse.ArgumentParser(description="Generate the synthetic panoptic data set.")
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
