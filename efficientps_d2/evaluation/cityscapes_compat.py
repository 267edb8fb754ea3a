"""Detectron2's Cityscapes evaluators, runnable with numpy 2.

The official Cityscapes scripts (cityscapesscripts 2.3.0, the latest release) break on numpy 2
after a whole inference pass:

* both call ``np.in1d``, which numpy 2.4 removed ("module 'numpy' has no attribute 'in1d'");
* the instance script dumps its matches with ``json.dumps(..., default=lambda o: o.__dict__)``,
  which fails on numpy 2 scalars, and writes them to ``matches.json`` in the *current directory*.

These subclasses run ``evaluate()`` with ``np.in1d`` restored as the flattened ``np.isin`` (its
documented replacement) and, for the instance script, a json writer that turns numpy values into
Python ones and puts relative file names in the evaluator's temporary folder, which is deleted
afterwards. Both patches last only for the call.

Not patched (it is the script's own logic, not numpy's): the instance script raises IndexError in
``evaluateMatches`` when a class has counted ground truth and predictions, but every prediction of
the class lies on ignored ground truth (groups, instances under 100 pixels).
"""

import contextlib
import functools
import json
import os

import numpy as np
from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

from ..atomic_io import atomic_write

__all__ = [
    "CompatCityscapesInstanceEvaluator",
    "CompatCityscapesSemSegEvaluator",
    "numpy_in1d_restored",
]


def _in1d(ar1, ar2, assume_unique=False, invert=False, **kwargs):
    return np.isin(ar1, ar2, assume_unique=assume_unique, invert=invert, **kwargs).ravel()


@contextlib.contextmanager
def numpy_in1d_restored():
    """``np.in1d`` available inside the block (a no-op where numpy still has it)."""
    if "in1d" in vars(np):
        yield
        return
    np.in1d = _in1d
    try:
        yield
    finally:
        del np.in1d


class CompatCityscapesSemSegEvaluator(CityscapesSemSegEvaluator):
    """Detectron2's ``CityscapesSemSegEvaluator`` (mIoU by the official script), numpy 2.4-proof."""

    def evaluate(self):
        with numpy_in1d_restored():
            return super().evaluate()


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.__dict__  # what the Cityscapes scripts do for their own objects


class CompatCityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """Detectron2's ``CityscapesInstanceEvaluator`` (AP by the official script), numpy 2-proof."""

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        folder = self._temp_dir

        def write_json(data, file_name):
            path = file_name if os.path.isabs(file_name) else os.path.join(folder, file_name)
            dump = functools.partial(json.dump, default=_to_json, sort_keys=True, indent=4)
            atomic_write(path, lambda f: dump(data, f), mode="w")

        original = cityscapes_eval.writeDict2JSON
        cityscapes_eval.writeDict2JSON = write_json
        try:
            with numpy_in1d_restored():
                return super().evaluate()
        finally:
            cityscapes_eval.writeDict2JSON = original
