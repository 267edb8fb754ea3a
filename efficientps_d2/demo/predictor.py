"""A predictor for single images and a demo that draws its panoptic output with Detectron2."""

import copy
import logging

import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..config_adapter import ConfigAdapter
from ..data.image_files import ImageInputError, prepare_image

__all__ = [
    "EfficientPSPredictor",
    "ImageInputError",
    "VisualizationDemo",
    "resolve_metadata",
]

logger = logging.getLogger(__name__)


def resolve_metadata(cfg):
    """The metadata to draw and export with: of the first test data set, else of the first
    training one (DATASETS.TEST / TRAIN, or ``dataloader.test`` / ``.train.dataset.names``).

    Returns:
        (metadata, data set name). Without a usable data set, a stand-in naming the classes
        "class 0", "class 1", ... and None (a warning says so; the COCO export needs a data set).
    """
    config = ConfigAdapter(cfg)
    for name in config.test_dataset_names + config.train_dataset_names:
        metadata = MetadataCatalog.get(name)
        if getattr(metadata, "stuff_classes", None):
            return metadata, name
        logger.warning(f"Data set '{name}' has no class names in its metadata; not using it.")
    logger.warning(
        "No data set with class names in DATASETS.TEST or DATASETS.TRAIN: classes are drawn as "
        "'class N'. Name a registered data set in DATASETS.TEST for real class names (the COCO "
        "panoptic export needs one)."
    )
    names = [f"class {i}" for i in range(config.num_classes)]
    return Metadata(name="__unnamed_classes", thing_classes=names, stuff_classes=names), None


class EfficientPSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` for EfficientPS, from a YAML or a LazyConfig config.

    The same call (a BGR (H, W, 3) uint8 image in, one output dict out, resized as the test
    loader resizes: INPUT.MIN/MAX_SIZE_TEST or ``dataloader.test.mapper.augmentations``), for
    any INPUT.FORMAT the model takes ("YCbCr", "YUV-BT.601", ...: the image is converted as the
    data loaders' ``read_image`` converts a file, see :func:`prepare_image`), plus:
    weights (MODEL.WEIGHTS / ``train.init_checkpoint``) load through
    :class:`~efficientps_d2.checkpoint.EfficientPSCheckpointer`, which refuses a checkpoint of
    another architecture or variant, and with TEST.AUG.ENABLED / ``train.tta.enabled`` the model
    runs with test-time augmentation (:class:`EfficientPSWithTTA`).
    """

    def __init__(self, cfg):
        config = ConfigAdapter(cfg)
        self.cfg = cfg.clone() if config.is_yaml else copy.deepcopy(cfg)
        model = config.build_model()
        if not config.weights:  # as the export tool says: the drawings show an untrained model
            logger.warning(
                f"{config.keys['weights']} is empty: predicting with random weights. Name the "
                f"trained ones, e.g. {config.override('weights', 'model_final.pth')}."
            )
        config.checkpointer(model).load(config.weights)
        self.model = (config.build_tta_model(model) or model).eval()
        self.metadata, self.dataset_name = resolve_metadata(cfg)
        self.aug = T.AugmentationList(config.build_test_augmentations())
        # Any format the model takes (it refused another when built): see prepare_image.
        self.input_format = config.input_format

    def __call__(self, original_image):
        """DefaultPredictor's call, with the config's list of test augmentations; an image it
        cannot take raises :class:`ImageInputError` (see :func:`prepare_image`)."""
        with torch.no_grad():
            image = prepare_image(original_image, self.aug, self.input_format)
            height, width = original_image.shape[:2]
            # uint8 (float64 for YUV-BT.601), as the test loader gives it (Detectron2's predictor
            # makes it float32): the model normalises it on its device, so a GPU uploads a
            # quarter of the bytes, and test-time augmentation resizes it as in evaluation (PIL,
            # not torch).
            image = torch.as_tensor(image)
            return self.model([{"image": image, "height": height, "width": width}])[0]


class VisualizationDemo:
    """Runs EfficientPS on images or video frames and draws the panoptic segmentation.

    Args:
        cfg: an EfficientPS config, YAML or LazyConfig (weights, device, test data set for class
            names).
        instance_mode: Detectron2's ``ColorMode`` for the drawing.
        predictor: instead of ``cfg``, a predictor with the same call and ``metadata`` and
            ``dataset_name`` attributes (e.g. :class:`efficientps_d2.export.ExportedPredictor`).
    """

    def __init__(self, cfg=None, instance_mode=ColorMode.IMAGE, *, predictor=None):
        if (cfg is None) == (predictor is None):
            raise ValueError("VisualizationDemo needs either a config or a predictor.")
        self.predictor = predictor if predictor is not None else EfficientPSPredictor(cfg)
        self.metadata = self.predictor.metadata
        self.dataset_name = self.predictor.dataset_name
        self.instance_mode = instance_mode

    def run_on_image(self, image):
        """
        Args:
            image: (H, W, 3) uint8 BGR image (as ``cv2.imread`` or ``read_image(..., "BGR")``).
        Returns:
            (predictions, vis): the model's output dict and a ``VisImage`` (``vis.get_image()`` is
            RGB).
        """
        predictions = self.predictor(image)
        panoptic_seg, segments_info = predictions["panoptic_seg"]
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        # Visualizer writes into segments_info; draw from a copy so the output stays the model's.
        vis = visualizer.draw_panoptic_seg(panoptic_seg.cpu(), copy.deepcopy(segments_info))
        return predictions, vis

    def run_on_video(self, frames):
        """Processes frames in order, with colours kept per tracked instance across frames.

        Args:
            frames: iterable of (H, W, 3) uint8 BGR frames.
        Yields:
            (predictions, vis_frame): the model's output and the drawn (H, W, 3) uint8 BGR frame.
        """
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in frames:
            predictions = self.predictor(frame)
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            vis = visualizer.draw_panoptic_seg_predictions(
                frame[:, :, ::-1], panoptic_seg.cpu(), copy.deepcopy(segments_info)
            )
            yield predictions, vis.get_image()[:, :, ::-1]
