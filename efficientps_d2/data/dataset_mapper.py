"""EfficientPS's dataset mapper: a panoptic annotation -> semantic targets over every class and
thing instances, both cut from the same augmented panoptic PNG."""

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from .image_files import ImageInputError, chw_tensor, read_image
from .metadata import thing_semantic_ids_from_config

__all__ = ["EfficientPSDatasetMapper", "check_augmentations"]


def check_augmentations(augmentations, key="augmentations"):
    """``augmentations`` as a list, refused (ValueError naming ``key``) unless it is a list of
    Detectron2 :class:`Augmentation` or :class:`Transform` objects, where Detectron2's
    ``AugmentationList`` raises a bare TypeError or AssertionError (``augmentations=null``, a
    name)."""
    sequence = isinstance(augmentations, Sequence) and not isinstance(augmentations, str)
    items = list(augmentations) if sequence else None  # a list, tuple or omegaconf ListConfig
    if items is None or not all(isinstance(a, (T.Augmentation, T.Transform)) for a in items):
        raise ValueError(
            f"{key} must be a list of Detectron2 Augmentation or Transform objects (in a "
            "LazyConfig, e.g. [L(T.ResizeShortestEdge)(short_edge_length=..., max_size=...)]; [] "
            f"for none), got {augmentations!r}."
        )
    return items


class EfficientPSDatasetMapper:
    """Maps a Detectron2 "standard" panoptic dataset dict to EfficientPS's inputs and targets.

    Input dict keys: ``file_name``, ``pan_seg_file_name`` (a COCO panoptic PNG, id = R + 256 G +
    256^2 B) and ``segments_info`` (dicts with ``id``, ``category_id``, optional ``isthing`` and
    ``iscrowd``), as Detectron2's "standard" panoptic loaders and
    :func:`~efficientps_d2.data.register_panoptic_dataset` yield them: ``category_id`` is the
    class's index in the all-class (semantic) space, for things too (Cityscapes: person = 11).
    Without ``isthing`` (Detectron2's Cityscapes loader leaves it out) a segment is a thing when
    its class is one of ``thing_semantic_ids``.
    Optional ``height``/``width`` are checked against the image.

    Output dict keys:

    - ``image``: uint8 tensor (C, H, W) in ``image_format``, after augmentation;
    - ``height``, ``width``: the original image size (what the model's output is resized to);
    - ``file_name`` and ``image_id`` (when given);
    - training only: ``sem_seg``, int64 tensor (H, W) of semantic class ids over every class (things
      as they are), ``ignore_label`` on void and crowd pixels; and ``instances``,
      :class:`Instances` of the non-crowd things still visible after augmentation, with
      ``gt_classes`` (int64 (N,), Mask R-CNN classes: the position of the segment's
      ``category_id`` in ``thing_semantic_ids``), ``gt_masks`` (:class:`BitMasks`
      (N, H, W)) and ``gt_boxes`` (:class:`Boxes` (N, 4), XYXY, the tight boxes of the masks).

    Pixels whose PNG id is not listed in ``segments_info`` are void; listed segments absent from
    the PNG are skipped. The mapper only reads files.
    """

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        thing_semantic_ids,
        ignore_label=255,
        num_classes=None,
    ):
        """
        Args:
            is_train: training (targets are built) or inference (only the image).
            augmentations: list of :class:`Augmentation` or :class:`Transform`; they see the image
                and, as ``sem_seg``, the panoptic label (so geometric ones move both alike).
            image_format: a format of :func:`detection_utils.read_image`, e.g. "BGR" or "RGB";
                images are read by :func:`~efficientps_d2.data.image_files.read_image`, as
                ``demo.py`` reads them (16-bit ones by their high byte).
            thing_semantic_ids: semantic (all-class) id of each Mask R-CNN class, see
                :func:`~efficientps_d2.data.metadata.thing_semantic_ids_from_config`.
            ignore_label: semantic target of void and crowd pixels.
            num_classes: number of semantic classes (stuff and things), to reject out-of-range stuff
                ids; None checks stuff ids against ``ignore_label`` only.
        """
        self.is_train = is_train
        split = "train" if is_train else "test"
        key = f"EfficientPSDatasetMapper's augmentations (dataloader.{split}.mapper.augmentations)"
        self.augmentations = T.AugmentationList(check_augmentations(augmentations, key))
        self.image_format = image_format
        self.thing_semantic_ids = [int(i) for i in thing_semantic_ids]
        self._thing_class = {s: k for k, s in enumerate(self.thing_semantic_ids)}
        self.ignore_label = int(ignore_label)
        self.num_classes = num_classes
        if num_classes is not None and not all(0 <= i < num_classes for i in thing_semantic_ids):
            raise ValueError(
                f"thing_semantic_ids {list(thing_semantic_ids)} must lie in [0, num_classes="
                f"{num_classes})."
            )
        if self.ignore_label in self.thing_semantic_ids:
            raise ValueError(f"ignore_label {ignore_label} is also a thing's semantic id.")
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[EfficientPSDatasetMapper] Augmentations used in {mode}: {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train=True):
        # Detectron2's resize (MIN_SIZE_TEST 0: none) and, in training, flip; the paper's
        # scale-then-crop recipe replaces the resize when INPUT.RANDOM_SCALE is enabled.
        augs = utils.build_augmentation(cfg, is_train)
        if is_train and cfg.INPUT.RANDOM_SCALE.ENABLED:
            min_scale, max_scale = cfg.INPUT.RANDOM_SCALE.RANGE
            target_height, target_width = cfg.INPUT.RANDOM_SCALE.TARGET_SIZE
            augs[0] = T.ResizeScale(min_scale, max_scale, target_height, target_width)
        crop = cfg.INPUT.CROP
        if is_train and crop.ENABLED:
            if cfg.INPUT.RANDOM_SCALE.ENABLED and crop.TYPE == "absolute":
                # The paper's scale-then-crop recipe. A scaled image smaller than the crop is not
                # padded (as the official training): the batch pads it, and its image size stays
                # its own, so the hard-pixel loss takes its quarter of the image's own pixels
                # (padding to the crop size made it every pixel of an image at scale 0.5) and
                # proposals are clipped to the image.
                augs.insert(1, T.FixedSizeCrop(tuple(crop.SIZE), pad=False))
            else:
                augs.insert(1, T.RandomCrop(crop.TYPE, crop.SIZE))

        # Targets are built in the training set's label space; inference needs no labels, so an
        # evaluation-only config may name only DATASETS.TEST.
        names = list(cfg.DATASETS.TRAIN) or ([] if is_train else list(cfg.DATASETS.TEST))
        if names:
            meta = MetadataCatalog.get(names[0])
            ignore_label = meta.get("ignore_label", 255)
            stuff_classes = meta.get("stuff_classes", None)
            num_classes = len(stuff_classes) if stuff_classes else None
        elif is_train:
            raise ValueError("DATASETS.TRAIN is empty: the training mapper needs its metadata.")
        else:
            ignore_label, num_classes = 255, None
        # The same map as the model's (read from DATASETS.TRAIN[0] here); inference needs none.
        thing_ids = thing_semantic_ids_from_config(cfg) if is_train else []
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "thing_semantic_ids": thing_ids,
            "ignore_label": ignore_label,
            "num_classes": num_classes,
        }

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one image's dict in Detectron2's standard panoptic format (class docs).
        Returns:
            dict: ``image``, ``height``, ``width``, ``file_name``/``image_id`` when given, and in
            training ``sem_seg`` and ``instances`` (class docs for shapes).
        """
        dataset_dict = copy.deepcopy(dataset_dict)  # the caller's dict is reused every epoch
        image = _read(dataset_dict["file_name"], self.image_format, "image", read_image)
        utils.check_image_size(dataset_dict, image)
        out = {k: dataset_dict[k] for k in ("file_name", "image_id") if k in dataset_dict}
        out["height"], out["width"] = dataset_dict["height"], dataset_dict["width"]

        if not self.is_train:
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            out["image"] = chw_tensor(aug_input.image)
            return out

        from panopticapi.utils import id2rgb, rgb2id  # optional dependency, needed for training

        pan_file = dataset_dict.get("pan_seg_file_name")
        if pan_file is None:
            raise ValueError(f"Image '{dataset_dict['file_name']}' has no 'pan_seg_file_name'.")
        segments = self._check_segments(dataset_dict.get("segments_info", []), pan_file)
        rgb = _read(pan_file, "RGB", "panoptic PNG", utils.read_image)
        if rgb.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"Panoptic PNG '{pan_file}' is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its image "
                f"'{dataset_dict['file_name']}' is {image.shape[1]}x{image.shape[0]}."
            )

        # Augment an index map (0 = void, k = k-th listed segment) encoded in 3 uint8 channels:
        # uint8 resizes with PIL's nearest neighbour (exact), and padding (FixedSizeCrop pads with
        # 255 or 0) decodes to an index outside 1..len(segments), i.e. void.
        index = _segment_index(rgb2id(rgb), np.array([s[0] for s in segments], np.int64))
        aug_input = T.AugInput(image, sem_seg=id2rgb(index))
        self.augmentations(aug_input)
        image = aug_input.image
        index = rgb2id(aug_input.sem_seg.astype(np.uint8, copy=False))
        index[index > len(segments)] = 0

        semantic = np.array([self.ignore_label] + [s[1] for s in segments], np.int64)
        # Tensors travel through the DataLoader's shared memory; numpy arrays would be pickled.
        out["image"] = chw_tensor(image)
        out["sem_seg"] = torch.as_tensor(semantic[index])

        thing_class = np.array([-1] + [s[2] for s in segments], np.int64)
        present = np.bincount(index.ravel(), minlength=len(segments) + 1) > 0
        # Things cropped away entirely have no mask left to learn from: drop them.
        kept = np.nonzero(present & (thing_class >= 0))[0]
        height, width = image.shape[:2]
        instances = Instances((height, width))
        masks = torch.as_tensor(index[None] == kept[:, None, None]).reshape(-1, height, width)
        instances.gt_masks = BitMasks(masks)
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()  # (0, 4) when empty
        instances.gt_classes = torch.as_tensor(thing_class[kept], dtype=torch.int64)
        out["instances"] = instances
        return out

    def _check_segments(self, segments_info, pan_file):
        """Validates ``segments_info``; returns (id, semantic id, thing id or -1) per segment, with
        the semantic id ``ignore_label`` and thing id -1 for crowd segments."""
        result, seen = [], set()
        for seg in segments_info:
            for key in ("id", "category_id"):
                if key not in seg:
                    raise ValueError(f"'{pan_file}': a segment has no '{key}': {seg}.")
            seg_id, category = int(seg["id"]), int(seg["category_id"])
            # Detectron2's Cityscapes loader gives no "isthing": the class says it.
            isthing = bool(seg.get("isthing", category in self._thing_class))
            if seg_id in seen:
                raise ValueError(f"'{pan_file}': segment id {seg_id} is listed twice.")
            seen.add(seg_id)
            if isthing:
                valid = category in self._thing_class
                expected = f"a thing class {self.thing_semantic_ids}"
            else:
                limit = self.num_classes if self.num_classes is not None else self.ignore_label
                valid = 0 <= category < limit and category not in self._thing_class
                expected = f"a stuff class in [0, {limit}) other than the things"
            if not valid:
                raise ValueError(
                    f"'{pan_file}': segment {seg_id} (isthing={isthing}) has category_id "
                    f"{category}, out of range for the metadata: expected {expected}."
                )
            if seg.get("iscrowd", 0):
                result.append((seg_id, self.ignore_label, -1))
            else:
                result.append((seg_id, category, self._thing_class.get(category, -1)))
        return result


def _read(path, image_format, what, read):
    # Detectron2's own errors name the file only sometimes; say which file and what it is for.
    try:
        return read(path, format=image_format)
    except ImageInputError as e:  # a fault of content (32-bit or float pixels): not skipped
        raise ImageInputError(f"The {what} '{path}' cannot be used: {e}") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"The {what} '{path}' does not exist.") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable files
        raise OSError(f"Could not read the {what} '{path}': {e}") from e


def _segment_index(ids, segment_ids):
    """int64 (H, W): k + 1 where ``ids`` equals ``segment_ids[k]``, 0 elsewhere (void)."""
    if len(segment_ids) == 0:
        return np.zeros(ids.shape, np.int64)
    order = np.argsort(segment_ids)
    position = np.clip(np.searchsorted(segment_ids[order], ids), 0, len(order) - 1)
    found = segment_ids[order][position] == ids
    return np.where(found, order[position] + 1, 0)
