"""Multi-scale and flip test-time augmentation (TTA) for EfficientPS's panoptic output.

The paper's best Cityscapes numbers are multi-scale; this wrapper reproduces that inference with
Detectron2's conventions (like ``GeneralizedRCNNWithTTA``, but for all three outputs)::

    model = EfficientPSWithTTA(cfg, model)   # settings: TEST.AUG.*
    outputs = model(batched_inputs)          # same input and output as EfficientPS in eval mode

For each short-side size in TEST.AUG.MIN_SIZES (the long side capped at MAX_SIZE) and,
with FLIP, its mirror image, the network runs once (``EfficientPS.inference(...,
do_postprocess=False)``). Then, in the frame of the requested output size:

- **semantic logits** of each run are cropped to the run's image size, mirrored back if flipped,
  resized bilinearly to the output size and **averaged as logits** (not softmax probabilities):
  the fusion weighs semantic logits against mask logits, ``FL = (sigmoid(A) + sigmoid(B)) (A + B)``,
  so averaged logits keep the scale that ``B`` has without TTA (averaged probabilities would turn
  into log-probabilities <= 0 and shift that balance), and one augmentation reproduces the plain
  model exactly;
- **detections** of all runs are mapped to the output frame (boxes mirrored back and rescaled), then
  merged by class-wise NMS at MODEL.ROI_HEADS.NMS_THRESH_TEST and cut to the
  TEST.DETECTIONS_PER_IMAGE best scores; each kept detection keeps the mask logits of the run it
  came from (mirrored if that run was flipped; masks are box-relative, so no rescaling is needed);
- ``EfficientPS.postprocess`` runs **once** on the merged logits and detections: the output has the
  plain model's contract ("sem_seg", "instances", "panoptic_seg").
"""

import copy
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.data.transforms import ResizeShortestEdge, ResizeTransform
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from ..config import tta_config
from ..data.image_files import chw_tensor, read_image
from .fast_inference import batched_nms
from .meta_arch import EfficientPS, check_input_images

__all__ = ["EfficientPSWithTTA", "check_tta_settings"]

_MASK_FIELDS = ("pred_masks", "pred_mask_logits")


def _whole_size(value):
    """``value`` as an int where it is a positive whole number (512, or 512.0 as a config may
    write it), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return int(value) if float(value).is_integer() and value > 0 else None


def check_tta_settings(min_sizes, max_size, flip, *, keys):
    """Checks test-time augmentation settings and returns them as ``(list[int], int, bool)``.

    Args:
        min_sizes: short-side sizes, a non-empty list (or tuple, ListConfig) of positive whole
            numbers; 512.0 is taken as 512, 512.5 refused.
        max_size: the long side's cap, a positive whole number.
        flip: True or False (or 1 or 0).
        keys: the names of the three settings where they came from, for the messages, e.g.
            ("TEST.AUG.MIN_SIZES", "TEST.AUG.MAX_SIZE", "TEST.AUG.FLIP").
    Raises:
        ValueError naming the key and the value at fault.
    """
    sizes = None
    if isinstance(min_sizes, Sequence) and not isinstance(min_sizes, str) and len(min_sizes):
        sizes = [_whole_size(s) for s in min_sizes]
    if sizes is None or None in sizes:
        raise ValueError(
            f"{keys[0]} must be a non-empty list of positive sizes in whole pixels, e.g. "
            f"[512, 1024], got {min_sizes!r}."
        )
    size = _whole_size(max_size)
    if size is None:
        raise ValueError(
            f"{keys[1]} must be a positive size in whole pixels, e.g. 2048, got {max_size!r}."
        )
    if not (isinstance(flip, (np.bool_, numbers.Integral)) and flip in (0, 1)):
        raise ValueError(f"{keys[2]} must be True or False, got {flip!r}.")
    return sizes, size, bool(flip)


class EfficientPSWithTTA(nn.Module):
    """EfficientPS with test-time augmentation; called like EfficientPS in eval mode.

    Args:
        cfg: config with TEST.AUG.{MIN_SIZES, MAX_SIZE, FLIP} (see
            :func:`~efficientps_d2.config.tta_config`),
            MODEL.ROI_HEADS.NMS_THRESH_TEST and TEST.DETECTIONS_PER_IMAGE.
        model: an :class:`EfficientPS` (or a DistributedDataParallel around one).
        batch_size: most augmented images per network call; only images of one size share a
            call (an image and its mirror image do), so batches need no padding.
        min_sizes, max_size, flip: override the config's TEST.AUG values.
        nms_thresh, detections_per_image: override MODEL.ROI_HEADS.NMS_THRESH_TEST and
            TEST.DETECTIONS_PER_IMAGE. With all five given, ``cfg`` may be None (LazyConfig runs).
    """

    def __init__(
        self,
        cfg,
        model,
        *,
        batch_size=2,
        min_sizes=None,
        max_size=None,
        flip=None,
        nms_thresh=None,
        detections_per_image=None,
    ):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, EfficientPS):
            raise TypeError(
                f"EfficientPSWithTTA needs an EfficientPS model, got {type(model).__name__}."
            )
        # A message names the config key of a setting read from cfg, the argument of one given.
        keys = ("min_sizes", "max_size", "flip")
        if cfg is not None:
            tta = tta_config(cfg)
            keys = tuple(
                f"TEST.AUG.{key.upper()}" if value is None else key
                for key, value in zip(keys, (min_sizes, max_size, flip))
            )
            min_sizes = tta.MIN_SIZES if min_sizes is None else min_sizes
            max_size = tta.MAX_SIZE if max_size is None else max_size
            flip = tta.FLIP if flip is None else flip
            if nms_thresh is None:
                nms_thresh = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
            if detections_per_image is None:
                detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        given = dict(
            min_sizes=min_sizes,
            max_size=max_size,
            flip=flip,
            nms_thresh=nms_thresh,
            detections_per_image=detections_per_image,
        )
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"EfficientPSWithTTA without a config (cfg=None) needs {', '.join(missing)}."
            )
        self.model = model
        self.min_sizes, self.max_size, self.flip = check_tta_settings(
            min_sizes, max_size, flip, keys=keys
        )
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.batch_size = max(1, int(batch_size))

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs: list of dicts with "image" (C, H, W) in the model's input format (or
                "file_name" to read it from) and optional "height"/"width" of the output.
        Returns:
            list of dicts, one per image: "sem_seg" (C, height, width) averaged logits,
            "instances" (merged detections at the output size, all-class ``pred_classes``),
            "panoptic_seg" (int32 (height, width) ids, segments_info) as EfficientPS gives them.
        """
        if self.model.training:
            raise RuntimeError(
                "EfficientPSWithTTA runs inference only: call .eval() on it (or on the model)."
            )
        if isinstance(batched_inputs, (list, tuple)):
            batched_inputs = [self._with_image(x) for x in batched_inputs]
        # As the model checks its inputs: a gray (1, H, W) image ran broadcast to 3 channels, and
        # an image without pixels or an (H, W, 3) one failed inside the resize.
        check_input_images(batched_inputs, self.model.input_format, "TTA model")
        with torch.no_grad():
            return [self._inference_one(x) for x in batched_inputs]

    def _with_image(self, dataset_dict):
        if not isinstance(dataset_dict, dict) or "image" in dataset_dict:
            return dataset_dict
        if "file_name" not in dataset_dict:
            return dataset_dict  # check_input_images names the missing image
        ret = copy.copy(dataset_dict)
        image = read_image(ret["file_name"], self.model.input_format)
        ret["image"] = chw_tensor(image)
        return ret

    def _augmented_images(self, image):
        """[(image, flipped)] for every size (and its mirror image with flip)."""
        height, width = image.shape[-2:]
        augmented = []
        for min_size in self.min_sizes:
            size = ResizeShortestEdge.get_output_shape(height, width, min_size, self.max_size)
            # At least one pixel a side: Detectron2 rounds a 1 x 600 image at MAX_SIZE 128 to 0.
            size = (max(1, size[0]), max(1, size[1]))
            resized = image if tuple(size) == (height, width) else _resize(image, size)
            augmented.append((resized, False))
            if self.flip:
                augmented.append((resized.flip(-1), True))
        return augmented

    def _inference_one(self, dataset_dict):
        image = dataset_dict["image"]
        height = dataset_dict.get("height") or image.shape[-2]
        width = dataset_dict.get("width") or image.shape[-1]
        augmented = self._augmented_images(image)

        sem_seg_sum, runs = None, []
        for chunk in self._batches(augmented):
            sem_seg_logits, detections, image_sizes = self.model.inference(
                [{"image": img} for img, _ in chunk], do_postprocess=False
            )
            for logits, det, size, (_, flipped) in zip(
                sem_seg_logits, detections, image_sizes, chunk
            ):
                logits = _to_output_frame(logits, size, flipped, (height, width))
                sem_seg_sum = logits if sem_seg_sum is None else sem_seg_sum + logits
                runs.append(_detections_to_output_frame(det, size, flipped, (height, width)))
        sem_seg = sem_seg_sum / len(augmented)
        instances = self._merge_detections(runs)
        return self.model.postprocess(sem_seg, instances, (height, width), height, width)

    def _batches(self, augmented):
        """Consecutive augmented images of one size, at most ``batch_size`` at a time."""
        batch = []
        for item in augmented:
            if batch and (len(batch) == self.batch_size or batch[0][0].shape != item[0].shape):
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _merge_detections(self, runs):
        merged = Instances.cat(runs) if len(runs) > 1 else runs[0]
        if len(merged) == 0:
            return merged
        boxes, scores = merged.pred_boxes.tensor, merged.scores
        keep = batched_nms(boxes, scores, merged.pred_classes, self.nms_thresh)
        # Best score first; equal scores keep the order they had (run by run, as each run ranked
        # them), so a single augmentation gives back the model's own order.
        keep = keep.sort().values
        keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
        return merged[keep[: self.detections_per_image]]


def _resize(image, size):
    """(C, H, W) tensor -> (C, h, w), with Detectron2's test-time resize (PIL for uint8)."""
    height, width = image.shape[-2:]
    array = image.permute(1, 2, 0).cpu().numpy()
    resized = ResizeTransform(height, width, size[0], size[1]).apply_image(array)
    return chw_tensor(resized).to(image.device)


def _to_output_frame(logits, image_size, flipped, output_size):
    """(C, H_pad, W_pad) logits of one run -> (C, height, width) in the original orientation."""
    logits = logits[:, : image_size[0], : image_size[1]]
    if flipped:
        logits = logits.flip(-1)
    return F.interpolate(logits[None], size=output_size, mode="bilinear", align_corners=False)[0]


def _detections_to_output_frame(detections, image_size, flipped, output_size):
    """Instances at one run's image size -> Instances at ``output_size``, unflipped."""
    boxes = detections.pred_boxes.tensor.clone()
    if flipped:
        # (x0, x1) <- (W - x1, W - x0); slices, not a list index (a blocking upload on CUDA).
        boxes[:, 0::2] = image_size[1] - boxes[:, 0::2].flip(1)
    boxes[:, 0::2] *= output_size[1] / image_size[1]
    boxes[:, 1::2] *= output_size[0] / image_size[0]
    out = Instances(
        output_size,
        pred_boxes=Boxes(boxes),
        scores=detections.scores,
        pred_classes=detections.pred_classes,
    )
    for name in _MASK_FIELDS:
        if detections.has(name):
            value = detections.get(name)
            out.set(name, value.flip(-1) if flipped else value)
    return out
