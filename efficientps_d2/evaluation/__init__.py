"""Evaluation: what Detectron2's evaluators lack for panoptic data, and the evaluator choice."""

from .atomic_outputs import AtomicOutputsMixin
from .build import ThingCOCOEvaluator, build_dataset_evaluator, build_evaluator, check_evaluable
from .cityscapes_compat import CompatCityscapesInstanceEvaluator, CompatCityscapesSemSegEvaluator
from .panoptic_pngs import PanopticEvaluator
from .panoptic_sem_seg import PanopticSemSegEvaluator, panoptic_to_semantic

__all__ = [
    "AtomicOutputsMixin",
    "build_dataset_evaluator",
    "build_evaluator",
    "check_evaluable",
    "CompatCityscapesInstanceEvaluator",
    "CompatCityscapesSemSegEvaluator",
    "PanopticEvaluator",
    "PanopticSemSegEvaluator",
    "panoptic_to_semantic",
    "ThingCOCOEvaluator",
]
