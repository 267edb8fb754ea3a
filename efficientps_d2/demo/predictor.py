"""A predictor for single images and a demo that draws its panoptic output with Detectron2."""

import copy
import logging

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..checkpoint import EfficientPSCheckpointer
from ..config import tta_config
from ..modeling.test_time_augmentation import EfficientPSWithTTA

__all__ = ["EfficientPSPredictor", "VisualizationDemo", "resolve_metadata"]

logger = logging.getLogger(__name__)


def resolve_metadata(cfg):
    """The metadata to draw and export with: of DATASETS.TEST[0], else of DATASETS.TRAIN[0].

    Returns:
        (metadata, data set name). Without a usable data set, a stand-in naming the classes
        "class 0", "class 1", ... and None (a warning says so; the COCO export needs a data set).
    """
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        metadata = MetadataCatalog.get(name)
        if getattr(metadata, "stuff_classes", None):
            return metadata, name
        logger.warning(f"Data set '{name}' has no class names in its metadata; not using it.")
    logger.warning(
        "No data set with class names in DATASETS.TEST or DATASETS.TRAIN: classes are drawn as "
        "'class N'. Name a registered data set in DATASETS.TEST for real class names (the COCO "
        "panoptic export needs one)."
    )
    names = [f"class {i}" for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)]
    return Metadata(name="__unnamed_classes", thing_classes=names, stuff_classes=names), None


class EfficientPSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` for EfficientPS.

    The same call (a BGR (H, W, 3) uint8 image in, one output dict out, INPUT.MIN/MAX_SIZE_TEST
    resizing), plus: weights load through :class:`EfficientPSCheckpointer`, which refuses a
    checkpoint of another architecture or variant, and with TEST.AUG.ENABLED the model
    runs with test-time augmentation (:class:`EfficientPSWithTTA`).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        model = build_model(self.cfg)
        EfficientPSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        if tta_config(cfg).ENABLED:
            model = EfficientPSWithTTA(self.cfg, model)
        self.model = model.eval()
        self.metadata, self.dataset_name = resolve_metadata(cfg)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got '{self.input_format}'.")


class VisualizationDemo:
    """Runs EfficientPS on images or video frames and draws the panoptic segmentation.

    Args:
        cfg: an EfficientPS config (MODEL.WEIGHTS, MODEL.DEVICE, DATASETS.TEST for class names).
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
