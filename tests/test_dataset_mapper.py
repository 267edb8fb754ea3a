"""EfficientPSDatasetMapper on hand-made panoptic annotations whose right targets are known."""

import os

import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances
from PIL import Image

from efficientps_d2.config import add_efficientps_config
from efficientps_d2.data.dataset_mapper import EfficientPSDatasetMapper
from efficientps_d2.data.synthetic import register_synthetic

H, W = 30, 44
# Cityscapes-like label space, things not first: semantic classes 0, 3, 4 are stuff, 1 and 2 things.
NUM_CLASSES = 5
THING_SEMANTIC_IDS = [1, 2]
IGNORE = 255

# Segment ids above 255 and 65535 make the G and B channels of the PNG matter.
ROAD, SKY, CAR_A, CAR_B, BUS, CROWD, UNLISTED, ABSENT = (
    7,
    70000,
    300,
    301,
    65536 * 3 + 5,
    900,
    4242,
    12345,
)
SEGMENTS = [
    {"id": ROAD, "category_id": 0, "isthing": False, "iscrowd": 0},
    {"id": SKY, "category_id": 4, "isthing": False},  # no iscrowd key: not crowd
    {"id": CAR_A, "category_id": 1, "isthing": True, "iscrowd": 0},
    {"id": CAR_B, "category_id": 1, "isthing": True, "iscrowd": 0},  # touches CAR_A
    {"id": BUS, "category_id": 2, "isthing": True, "iscrowd": 0},
    {"id": CROWD, "category_id": 2, "isthing": True, "iscrowd": 1},
    {"id": ABSENT, "category_id": 3, "isthing": False, "iscrowd": 0},  # not in the PNG
]
# Expected semantic class and Mask R-CNN class of each PNG id (UNLISTED and 0 are void).
SEMANTIC = {ROAD: 0, SKY: 4, CAR_A: 1, CAR_B: 1, BUS: 2, CROWD: IGNORE, UNLISTED: IGNORE, 0: IGNORE}
THING_CLASS = {CAR_A: 0, CAR_B: 0, BUS: 1}


def _id_map():
    ids = np.zeros((H, W), np.int64)
    ids[:12] = SKY
    ids[12:28] = ROAD  # rows 28-29 stay void
    ids[14:22, 2:10] = CAR_A
    ids[14:22, 10:16] = CAR_B
    ids[4:16, 30:42] = BUS
    ids[20:26, 20:28] = CROWD
    ids[0:3, 0:5] = UNLISTED
    return ids


def _write_png(path, ids):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def record(tmp_path):
    """A dataset dict with its files; the image's pixel (y, x) has R = x, G = y, B = 200."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = np.arange(W)[None]
    image[..., 1] = np.arange(H)[:, None]
    image[..., 2] = 200
    Image.fromarray(image).save(tmp_path / "img.png")
    _write_png(tmp_path / "pan.png", _id_map())
    return {
        "file_name": str(tmp_path / "img.png"),
        "image_id": 7,
        "height": H,
        "width": W,
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "segments_info": [dict(s) for s in SEGMENTS],
    }


def _mapper(augmentations=(), is_train=True, image_format="RGB"):
    return EfficientPSDatasetMapper(
        is_train,
        augmentations=list(augmentations),
        image_format=image_format,
        thing_semantic_ids=THING_SEMANTIC_IDS,
        ignore_label=IGNORE,
        num_classes=NUM_CLASSES,
    )


def _expected(ids):
    sem = np.vectorize(SEMANTIC.get)(ids)
    things = [i for i in (CAR_A, CAR_B, BUS) if (ids == i).any()]
    return sem, things


def _check(out, ids):
    """``out`` holds the targets of the (already augmented) PNG id map ``ids``."""
    sem, things = _expected(ids)
    assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == ids.shape
    np.testing.assert_array_equal(out["sem_seg"].numpy(), sem)
    inst = out["instances"]
    assert isinstance(inst, Instances) and inst.image_size == ids.shape
    assert inst.gt_classes.dtype == torch.int64
    assert inst.gt_classes.tolist() == [THING_CLASS[i] for i in things]
    masks, boxes = inst.gt_masks.tensor, inst.gt_boxes.tensor
    assert masks.dtype == torch.bool and masks.shape == (len(things), *ids.shape)
    for mask, box, seg_id in zip(masks, boxes, things):
        np.testing.assert_array_equal(mask.numpy(), ids == seg_id)
        rows, cols = np.nonzero(ids == seg_id)
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_outputs_without_augmentation(record):
    out = _mapper()(record)
    assert set(out) == {"file_name", "image_id", "height", "width", "image", "sem_seg", "instances"}
    assert (out["height"], out["width"], out["image_id"]) == (H, W, 7)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert out["image"][0, 5, 9] == 9 and out["image"][1, 5, 9] == 5  # RGB, CHW
    _check(out, _id_map())
    # The crowd bus is ignored everywhere, void and unlisted ids too.
    assert (out["sem_seg"][20:26, 20:28] == IGNORE).all()
    assert (out["sem_seg"][28:] == IGNORE).all() and (out["sem_seg"][:3, :5] == IGNORE).all()
    assert len(out["instances"]) == 3  # CAR_A, CAR_B, BUS; not the crowd, not ABSENT


def test_input_dict_is_not_modified(record):
    before = {k: (list(map(dict, v)) if k == "segments_info" else v) for k, v in record.items()}
    _mapper()(record)
    assert record == before


def test_flip_then_crop_keep_masks_and_boxes_consistent(record):
    # Flip, then a crop that cuts CAR_B in half and removes the (flipped) CAR_A entirely.
    x0, y0, w, h = 0, 2, 31, 25
    augs = [T.RandomFlip(prob=1.0), T.CropTransform(x0, y0, w, h)]
    out = _mapper(augs)(record)
    ids = _id_map()[:, ::-1][y0 : y0 + h, x0 : x0 + w]
    assert not (ids == CAR_A).any() and (ids == CAR_B).any()
    _check(out, ids)
    assert out["instances"].gt_classes.tolist() == [0, 1]
    assert (out["height"], out["width"]) == (H, W)  # still the original size
    image = out["image"].numpy()
    assert image.shape == (3, h, w)
    np.testing.assert_array_equal(image[0, 0], (W - 1 - np.arange(x0, x0 + w)))  # R = original x


def test_a_flipped_one_pixel_crop(record):
    """A flipped 1 x 1 image kept a negative stride (numpy calls it contiguous), and torch
    refused it: "At least one stride in the given numpy array is negative"."""
    out = _mapper([T.RandomFlip(prob=1.0), T.CropTransform(30, 15, 1, 1)])(record)
    _check(out, _id_map()[:, ::-1][15:16, 30:31])
    assert out["image"].flatten().tolist() == [W - 1 - 30, 15, 200]


def test_fixed_size_crop_padding_is_void(record):
    augs = [T.RandomFlip(prob=1.0), T.FixedSizeCrop((H + 6, W + 10))]
    out = _mapper(augs)(record)
    ids = np.zeros((H + 6, W + 10), np.int64)
    ids[:H, :W] = _id_map()[:, ::-1]
    _check(out, ids)
    assert (out["sem_seg"][H:] == IGNORE).all() and (out["sem_seg"][:, W:] == IGNORE).all()
    assert (out["image"][:, H:] == 128).all()


def test_resize_uses_nearest_labels(record):
    out = _mapper([T.ResizeTransform(H, W, 2 * H, 3 * W)])(record)
    ids = np.repeat(np.repeat(_id_map(), 2, axis=0), 3, axis=1)
    _check(out, ids)


def test_random_scale_flip_crop_pipeline_stays_consistent(record):
    augs = [T.ResizeScale(0.5, 2.0, H, W), T.FixedSizeCrop((H, W)), T.RandomFlip()]
    mapper = _mapper(augs)
    np.random.seed(0)
    for _ in range(8):
        out = mapper(record)
        inst = out["instances"]
        assert out["image"].shape[1:] == out["sem_seg"].shape == inst.image_size == (H, W)
        np.testing.assert_array_equal(
            inst.gt_boxes.tensor.numpy(), inst.gt_masks.get_bounding_boxes().tensor.numpy()
        )
        assert inst.gt_masks.tensor.flatten(1).any(1).all()  # no empty masks
        semantic = torch.tensor(THING_SEMANTIC_IDS)[inst.gt_classes]
        for mask, cls in zip(inst.gt_masks.tensor, semantic):
            assert (out["sem_seg"][mask] == cls).all()


@pytest.mark.parametrize("segments", [[], "stuff-only"])
def test_no_things_gives_empty_instances(record, tmp_path, segments):
    if segments == "stuff-only":
        segments = [dict(SEGMENTS[0]), dict(SEGMENTS[1])]
        ids = _id_map()
    else:
        ids = np.zeros((H, W), np.int64)
    _write_png(tmp_path / "pan.png", ids)
    record["segments_info"] = segments
    out = _mapper()(record)
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (H, W)
    assert inst.gt_masks.tensor.shape == (0, H, W) and inst.gt_masks.tensor.dtype == torch.bool
    assert inst.gt_boxes.tensor.shape == (0, 4)
    assert inst.gt_classes.shape == (0,) and inst.gt_classes.dtype == torch.int64
    if not segments:
        assert (out["sem_seg"] == IGNORE).all()


def test_inference_returns_only_the_image(record):
    mapper = _mapper([T.ResizeShortestEdge(60, 1000, "choice")], is_train=False)
    out = mapper(record)
    assert set(out) == {"file_name", "image_id", "height", "width", "image"}
    assert (out["height"], out["width"]) == (H, W)
    assert out["image"].shape == (3, 60, 88) and out["image"].dtype == torch.uint8
    # Labels are not read at inference: a record without them works.
    del record["pan_seg_file_name"], record["segments_info"]
    assert set(mapper(record)) == {"file_name", "image_id", "height", "width", "image"}


def test_bgr_format(record):
    out = _mapper(image_format="BGR")(record)
    assert out["image"][2, 5, 9] == 9 and out["image"][0, 5, 9] == 200


def test_missing_and_unreadable_files(record, tmp_path):
    mapper = _mapper()
    bad = dict(record, file_name=str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        mapper(bad)
    bad = dict(record, pan_seg_file_name=str(tmp_path / "nope.png"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        mapper(bad)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(OSError, match="broken.png"):
        mapper(dict(record, pan_seg_file_name=str(tmp_path / "broken.png")))
    with pytest.raises(OSError, match="broken.png"):
        _mapper(is_train=False)(dict(record, file_name=str(tmp_path / "broken.png")))


def test_label_size_mismatch(record, tmp_path):
    _write_png(tmp_path / "small.png", np.zeros((H - 1, W), np.int64))
    with pytest.raises(ValueError, match="small.png.*img.png"):
        _mapper()(dict(record, pan_seg_file_name=str(tmp_path / "small.png")))


@pytest.mark.parametrize(
    "segment, value",
    [
        ({"id": CAR_A, "category_id": 0, "isthing": True}, 0),  # a stuff class marked as thing
        ({"id": CAR_A, "category_id": 7, "isthing": True}, 7),
        ({"id": ROAD, "category_id": 5, "isthing": False}, 5),  # == NUM_CLASSES
        ({"id": ROAD, "category_id": -1, "isthing": False}, -1),
        ({"id": ROAD, "category_id": 2, "isthing": False}, 2),  # a thing class marked as stuff
    ],
)
def test_out_of_range_category(record, segment, value):
    # Checked even for segments that augmentation would crop away, and for ABSENT ones.
    record["segments_info"].append(dict(segment, id=ABSENT + 1))
    with pytest.raises(ValueError, match=rf"pan.png.*segment {ABSENT + 1} .*category_id {value}"):
        _mapper()(record)


def test_thing_ids_outside_the_classes_or_equal_to_the_ignore_label_are_refused():
    def mapper(thing_ids, num_classes):
        return EfficientPSDatasetMapper(
            augmentations=[],
            image_format="RGB",
            thing_semantic_ids=thing_ids,
            ignore_label=255,
            num_classes=num_classes,
        )

    with pytest.raises(
        ValueError, match=r"thing_semantic_ids \[2, 5\] must lie in \[0, num_classes=5\)"
    ):
        mapper([2, 5], 5)
    # Unchecked against a class count, a thing must still not be labelled void.
    with pytest.raises(ValueError, match="ignore_label 255 is also a thing's semantic id"):
        mapper([2, 255], None)


def test_duplicate_segment_id(record):
    record["segments_info"].append(dict(SEGMENTS[0]))
    with pytest.raises(ValueError, match=f"pan.png.*segment id {ROAD}"):
        _mapper()(record)


def test_mapper_writes_nothing(record, tmp_path):
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)}
    _mapper([T.RandomFlip(prob=1.0)])(record)
    _mapper(is_train=False)(record)
    assert {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)} == before


@pytest.fixture
def synthetic_names(tmp_path):
    names = register_synthetic(
        str(tmp_path), prefix="test_mapper_synthetic", num_train=3, num_val=1, size=(48, 64)
    )
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(train_name):
    cfg = get_cfg()
    add_efficientps_config(cfg)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 400
    return cfg


def test_the_papers_crop_does_not_pad_a_downscaled_image(synthetic_names, record):
    """Padded to the crop size, an image at scale 0.5 had the hard-pixel loss take its quarter
    of the crop, i.e. every one of its own pixels: no hard-pixel mining for a third of the
    training images. It keeps its own size now (the batch pads it, and knows its size)."""
    cfg = _cfg(synthetic_names[0])
    cfg.INPUT.RANDOM_SCALE.ENABLED = True
    cfg.INPUT.RANDOM_SCALE.RANGE, cfg.INPUT.RANDOM_SCALE.TARGET_SIZE = [0.5, 0.5], [H, W]
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = True, "absolute", [H, W]
    out = _mapper(EfficientPSDatasetMapper.from_config(cfg, True)["augmentations"])(record)
    assert out["image"].shape[1:] == out["sem_seg"].shape == (H // 2, W // 2)
    assert out["instances"].image_size == (H // 2, W // 2)


def test_from_config(synthetic_names):
    cfg = _cfg(synthetic_names[0])
    meta = MetadataCatalog.get(synthetic_names[0])
    mapper = EfficientPSDatasetMapper(cfg, True)
    assert mapper.is_train and mapper.image_format == "RGB"
    assert mapper.thing_semantic_ids == sorted(meta.thing_dataset_id_to_contiguous_id.values())
    assert mapper.ignore_label == meta.ignore_label and mapper.num_classes == len(
        meta.stuff_classes
    )
    kinds = [type(a) for a in mapper.augmentations.augs]
    assert kinds == [T.ResizeShortestEdge, T.RandomFlip]

    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "absolute", [32, 40]
    kinds = [type(a) for a in EfficientPSDatasetMapper(cfg, True).augmentations.augs]
    assert kinds == [T.ResizeShortestEdge, T.RandomCrop, T.RandomFlip]

    cfg.INPUT.RANDOM_SCALE.ENABLED = True
    cfg.INPUT.RANDOM_SCALE.TARGET_SIZE = [48, 64]
    augs = EfficientPSDatasetMapper(cfg, True).augmentations.augs
    assert [type(a) for a in augs] == [T.ResizeScale, T.FixedSizeCrop, T.RandomFlip]
    assert (augs[0].target_height, augs[0].target_width) == (48, 64)
    assert tuple(augs[1].crop_size) == (32, 40)
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "relative_range", [0.5, 0.5]
    kinds = [type(a) for a in EfficientPSDatasetMapper(cfg, True).augmentations.augs]
    assert kinds == [T.ResizeScale, T.RandomCrop, T.RandomFlip]

    cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS = [3, 4, 5]  # the config key wins over the metadata
    assert EfficientPSDatasetMapper(cfg, True).thing_semantic_ids == [3, 4, 5]

    test_mapper = EfficientPSDatasetMapper(cfg, is_train=False)
    assert not test_mapper.is_train
    assert [type(a) for a in test_mapper.augmentations.augs] == [T.ResizeShortestEdge]


def test_on_synthetic_data(synthetic_names):
    """The mapper's targets agree with the generator's annotations on real synthetic images."""
    cfg = _cfg(synthetic_names[0])
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = EfficientPSDatasetMapper(cfg, True)
    for d in DatasetCatalog.get(synthetic_names[0]):
        out = mapper(d)
        things = [s for s in d["segments_info"] if s["isthing"]]
        assert out["instances"].gt_classes.tolist() == [
            mapper.thing_semantic_ids.index(s["category_id"]) for s in things
        ]
        areas = out["instances"].gt_masks.tensor.flatten(1).sum(1).tolist()
        assert areas == [s["area"] for s in things]  # 48 px shortest edge: no resizing
        assert (out["sem_seg"] != IGNORE).all()  # the synthetic data has no void
        counts = torch.bincount(out["sem_seg"].flatten(), minlength=mapper.num_classes)
        for seg in d["segments_info"]:
            assert counts[seg["category_id"]] >= seg["area"]
    test_out = EfficientPSDatasetMapper(cfg, is_train=False)(d)
    assert test_out["image"].shape == (3, 96, 128)


def test_16_bit_images_are_read_as_the_demo_reads_them(record, tmp_path):
    """Training read a 16-bit grayscale PNG through PIL's I;16 -> RGB conversion, which clips it
    (all but the darkest pixels white), while demo.py reads it by its high byte as OpenCV does:
    a model trained on such data saw other pixels at test time."""
    import cv2

    from efficientps_d2.demo import ImageInputError, read_bgr_image

    values = np.random.RandomState(0).randint(0, 65536, (H, W)).astype(np.uint16)
    depth = str(tmp_path / "depth.png")
    cv2.imwrite(depth, values)
    expected = np.repeat((values >> 8).astype(np.uint8)[None], 3, axis=0)
    assert np.array_equal(read_bgr_image(depth).transpose(2, 0, 1), expected)
    for is_train in (True, False):
        for image_format in ("BGR", "RGB"):
            out = _mapper(is_train=is_train, image_format=image_format)(
                dict(record, file_name=depth)
            )
            assert np.array_equal(out["image"].numpy(), expected), (is_train, image_format)
    # A float image trained as a black one: refused, naming the file (not skipped as unreadable).
    Image.fromarray(np.random.RandomState(1).rand(H, W).astype(np.float32)).save(
        tmp_path / "float.tif"
    )
    with pytest.raises(ImageInputError, match="float.tif' cannot be used: a floating-point"):
        _mapper()(dict(record, file_name=str(tmp_path / "float.tif")))
