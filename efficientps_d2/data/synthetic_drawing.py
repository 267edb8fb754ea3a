"""Drawing the built-in synthetic panoptic data: its categories and one image with its segments.

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

Category dataset ids are deliberately neither contiguous nor things-first (stuff 1-3, things 5-7):
code that confuses dataset ids with contiguous ids fails on this data.

:mod:`efficientps_d2.data.synthetic` writes, registers and generates the data set from these.
"""

import cv2
import numpy as np

__all__ = ["SYNTHETIC_CATEGORIES", "STUFF_IDS", "THING_IDS", "render_sample"]

SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "sky", "isthing": 0, "color": [70, 130, 180], "supercategory": "stuff"},
    {"id": 2, "name": "ground", "isthing": 0, "color": [110, 160, 60], "supercategory": "stuff"},
    {"id": 3, "name": "water", "isthing": 0, "color": [30, 60, 140], "supercategory": "stuff"},
    {"id": 5, "name": "disc", "isthing": 1, "color": [220, 50, 50], "supercategory": "shape"},
    {"id": 6, "name": "rectangle", "isthing": 1, "color": [240, 200, 40], "supercategory": "shape"},
    {"id": 7, "name": "triangle", "isthing": 1, "color": [190, 60, 200], "supercategory": "shape"},
]
_SKY, _GROUND, _WATER, _DISC, _RECTANGLE, _TRIANGLE = (c["id"] for c in SYNTHETIC_CATEGORIES)
STUFF_IDS = (_SKY, _GROUND, _WATER)
THING_IDS = (_DISC, _RECTANGLE, _TRIANGLE)

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
            kind = THING_IDS[int(rng.integers(len(THING_IDS)))]
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
    present_stuff = [c for c in STUFF_IDS if np.any((stuff == c) & (owner < 0))]
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
