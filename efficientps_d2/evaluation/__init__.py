"""Evaluation: what Detectron2's evaluators lack for panoptic data, and the evaluator choice."""

from .build import build_dataset_evaluator, build_evaluator
from .instance_ap import ThingCOCOEvaluator
from .panoptic_sem_seg import PanopticSemSegEvaluator, panoptic_to_semantic

__all__ = [
    "build_dataset_evaluator",
    "build_evaluator",
    "PanopticSemSegEvaluator",
    "panoptic_to_semantic",
    "ThingCOCOEvaluator",
]
