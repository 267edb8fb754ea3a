"""Evaluation: what Detectron2's evaluators lack for panoptic data, and the evaluator choice."""

from .build import ThingCOCOEvaluator, build_evaluator
from .panoptic_sem_seg import PanopticSemSegEvaluator, panoptic_to_semantic

__all__ = [
    "build_evaluator",
    "PanopticSemSegEvaluator",
    "panoptic_to_semantic",
    "ThingCOCOEvaluator",
]
