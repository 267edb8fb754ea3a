"""Chooses Detectron2's evaluators for a data set from its ``evaluator_type``."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
)

from .instance_ap import ThingCOCOEvaluator
from .panoptic_sem_seg import PanopticSemSegEvaluator

SUPPORTED = ("coco_panoptic_seg", "cityscapes_panoptic_seg")


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Panoptic quality, plus semantic mIoU and instance AP where the data set allows.

    - "coco_panoptic_seg" (COCO panoptic, custom and synthetic data): COCOPanopticEvaluator (PQ),
      PanopticSemSegEvaluator (mIoU), and ThingCOCOEvaluator (box/mask AP) when the metadata
      names an instance json (``json_file``).
    - "cityscapes_panoptic_seg": COCOPanopticEvaluator, CityscapesSemSegEvaluator and
      CityscapesInstanceEvaluator (the official Cityscapes scripts).
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return build_dataset_evaluator(dataset_name, output_folder)


def build_dataset_evaluator(dataset_name, output_folder):
    """:func:`build_evaluator` without a config (for LazyConfig files); ``dataset_name`` may be a
    one-element list, as ``get_detection_dataset_dicts`` takes."""
    if not isinstance(dataset_name, str):
        if len(dataset_name) != 1:
            raise ValueError(f"Evaluate one data set at a time, got {list(dataset_name)}.")
        dataset_name = dataset_name[0]
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type")
    if evaluator_type == "coco_panoptic_seg":
        evaluators = [
            COCOPanopticEvaluator(dataset_name, output_folder),
            PanopticSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
        ]
        if meta.get("json_file") and os.path.isfile(meta.json_file):
            evaluators.append(
                ThingCOCOEvaluator(
                    dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder
                )
            )
    elif evaluator_type == "cityscapes_panoptic_seg":
        evaluators = [
            COCOPanopticEvaluator(dataset_name, output_folder),
            CityscapesSemSegEvaluator(dataset_name),
            CityscapesInstanceEvaluator(dataset_name),
        ]
    else:
        raise NotImplementedError(
            f"Data set '{dataset_name}' has evaluator_type '{evaluator_type}'; EfficientPS "
            f"evaluates panoptic data sets of type {list(SUPPORTED)} (register yours with "
            "efficientps_d2.data.register_panoptic_dataset)."
        )
    return DatasetEvaluators(evaluators)
