"""Pictures while training: the panoptic prediction next to the ground truth, in tensorboard.

Detectron2's ``GeneralizedRCNN.visualize_training`` shows ground-truth boxes next to proposals
every ``VIS_PERIOD`` iterations. For panoptic segmentation the picture to watch is the fused
output: :class:`PanopticVisualizationHook` runs the model in eval mode on one training image (the
first of DATASETS.TRAIN[0], un-augmented, resized as at test time) every ``VIS_PERIOD``
iterations and puts ``[ground truth | prediction]``, both drawn by Detectron2's ``Visualizer``,
into the event storage, which the trainer's ``TensorboardXWriter`` writes. It lives in a hook,
not in the model's forward, so inference never pays for it.
"""

import copy
import logging
import os

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer
from torch.nn.parallel import DistributedDataParallel

from .config_adapter import ConfigAdapter
from .data.image_files import chw_tensor, read_image, to_uint8
from .data.metadata import with_isthing

__all__ = [
    "PanopticVisualizationHook",
    "add_panoptic_visualization",
    "draw_panoptic_pair",
]

logger = logging.getLogger(__name__)

#: The event-storage (tensorboard) name of the pictures.
IMAGE_NAME = "panoptic: ground truth (left) | prediction (right)"


def draw_panoptic_pair(rgb, dataset_dict, panoptic_seg, segments_info, metadata, max_side=1024):
    """``[ground truth | prediction]`` as one (H, 2W, 3) uint8 RGB picture.

    Args:
        rgb: (H, W, 3) uint8 RGB image.
        dataset_dict: its Detectron2 dataset dict ("pan_seg_file_name", "segments_info" with
            contiguous ids); without "pan_seg_file_name" the left half is the bare image.
        panoptic_seg, segments_info: the model's "panoptic_seg" output at (H, W).
        metadata: the data set's metadata (class names, colours, id maps).
        max_side: the longer side of each half is scaled down to this.
    """
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    gt = Visualizer(rgb, metadata, scale=scale)
    if dataset_dict.get("pan_seg_file_name"):
        gt_dict = {
            "pan_seg_file_name": dataset_dict["pan_seg_file_name"],
            "segments_info": with_isthing(dataset_dict["segments_info"], metadata),
        }
        gt = gt.draw_dataset_dict(gt_dict)
    else:
        gt = gt.get_output()
    pred = Visualizer(rgb, metadata, scale=scale).draw_panoptic_seg(
        panoptic_seg.cpu(), copy.deepcopy(segments_info)
    )
    return np.concatenate([gt.get_image(), pred.get_image()], axis=1)


class PanopticVisualizationHook(HookBase):
    """Every ``period`` iterations, puts :data:`IMAGE_NAME` into the trainer's event storage.

    Register it before the ``PeriodicWriter`` (:func:`add_panoptic_visualization` does), on the
    main process only.

    Args:
        period: iterations between pictures (> 0).
        dataset_name: the data set whose first image is drawn.
        augmentations: the test-time augmentations, as the test data loader applies them.
        input_format: INPUT.FORMAT, any format the model takes ("BGR", "RGB", "YCbCr", ...).
    """

    def __init__(self, period, dataset_name, *, augmentations, input_format="BGR"):
        if period <= 0:
            raise ValueError(f"VIS_PERIOD must be > 0 for the panoptic pictures, got {period}.")
        self._period = period
        self._dataset_name = dataset_name
        self._augmentations = T.AugmentationList(list(augmentations))
        self._input_format = input_format
        self._dict = None

    @classmethod
    def from_config(cls, cfg):
        """From a YAML config (VIS_PERIOD, DATASETS.TRAIN[0], INPUT) or a LazyConfig
        (``train.vis_period``, the first training data set, the test mapper's augmentations and
        ``model.input_format``)."""
        config = ConfigAdapter(cfg)
        names = config.train_dataset_names
        if not names:
            raise ValueError(
                f"{config.keys['vis_period']} > 0 draws a training image, but "
                f"{config.keys['train_dataset_names']} is empty."
            )
        return cls(
            config.vis_period,
            names[0],
            augmentations=config.build_test_augmentations(),  # what the test mapper builds
            input_format=config.input_format,
        )

    def before_train(self):
        dicts = DatasetCatalog.get(self._dataset_name)
        if not dicts:
            raise ValueError(f"Data set '{self._dataset_name}' (VIS_PERIOD) has no image.")
        self._dict = dicts[0]
        missing = [
            self._dict[k]
            for k in ("file_name", "pan_seg_file_name")
            if k in self._dict and not os.path.isfile(self._dict[k])
        ]
        if missing:
            raise FileNotFoundError(
                f"VIS_PERIOD draws the first image of '{self._dataset_name}', but {missing} do "
                "not exist."
            )
        if "pan_seg_file_name" not in self._dict:
            logger.warning(
                f"'{self._dataset_name}' has no panoptic ground truth (pan_seg_file_name): the "
                "pictures show the prediction next to the bare image."
            )

    def after_step(self):
        if (self.trainer.iter + 1) % self._period == 0:
            self.trainer.storage.put_image(IMAGE_NAME, self.draw().transpose(2, 0, 1))

    def draw(self):
        """The picture for the model as it is now: (H, 2W, 3) uint8 RGB."""
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        image = read_image(self._dict["file_name"], format=self._input_format)
        height, width = image.shape[:2]
        resized = T.AugInput(image)
        self._augmentations(resized)
        resized = resized.image
        inputs = {
            "image": chw_tensor(resized),
            "height": height,
            "width": width,
        }
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                panoptic_seg, segments_info = model([inputs])[0]["panoptic_seg"]
        finally:
            model.train(was_training)
        # Detectron2's inverse of read_image's conversion (as tools/visualize_data draws): exact
        # for BGR/RGB, within PIL's rounding for the others (YCbCr, HSV: 3-4 levels; LAB: ~10).
        # YUV-BT.601 comes back as float.
        rgb = to_uint8(utils.convert_image_to_rgb(image, self._input_format or "RGB"))
        metadata = MetadataCatalog.get(self._dataset_name)
        return draw_panoptic_pair(rgb, self._dict, panoptic_seg, segments_info, metadata)


def add_panoptic_visualization(cfg, hook_list):
    """``hook_list`` with a :class:`PanopticVisualizationHook` before the ``PeriodicWriter`` when
    ``cfg.VIS_PERIOD`` (a LazyConfig's ``train.vis_period``) > 0 (on the main process, which writes
    tensorboard)."""
    if ConfigAdapter(cfg).vis_period <= 0 or not comm.is_main_process():
        return hook_list
    hook = PanopticVisualizationHook.from_config(cfg)
    writers = [i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)]
    index = writers[0] if writers else len(hook_list)
    return hook_list[:index] + [hook] + hook_list[index:]
