"""What ``demo.py`` is made of: a predictor, its drawing, the COCO panoptic writer and the
image/video loops."""

from .coco_panoptic_writer import (
    CocoPanopticWriter,
    ImageIds,
    id_to_rgb,
    panoptic_categories,
    to_coco_segments,
)
from .predictor import (
    EfficientPSPredictor,
    ImageInputError,
    VisualizationDemo,
    resolve_metadata,
)
from .runner import (
    VIDEO_CODECS,
    ImageRunError,
    ImageRunSummary,
    VideoInputError,
    VideoOutputError,
    VideoRunSummary,
    check_image_outputs,
    collect_images,
    count_video_frames,
    display_available,
    open_video,
    open_video_writer,
    open_webcam,
    read_bgr_image,
    run_on_images,
    run_on_video,
    video_output_path,
)

__all__ = [
    "VIDEO_CODECS",
    "CocoPanopticWriter",
    "EfficientPSPredictor",
    "ImageIds",
    "ImageInputError",
    "ImageRunError",
    "ImageRunSummary",
    "VideoInputError",
    "VideoOutputError",
    "VideoRunSummary",
    "VisualizationDemo",
    "check_image_outputs",
    "collect_images",
    "count_video_frames",
    "display_available",
    "id_to_rgb",
    "open_video",
    "open_video_writer",
    "open_webcam",
    "read_bgr_image",
    "panoptic_categories",
    "resolve_metadata",
    "run_on_images",
    "run_on_video",
    "to_coco_segments",
    "video_output_path",
]
