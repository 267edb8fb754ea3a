"""Detectron2's COCOPanopticEvaluator, keeping the panoptic PNGs it scores.

``COCOPanopticEvaluator`` writes ``predictions.json`` to its output folder but the PNGs to a
temporary folder that ``evaluate()`` deletes, so the evaluated predictions cannot be looked at or
scored again. With ``png_dir`` this subclass also writes each PNG there as it is processed (every
process its own images, atomically, overwriting older ones of the same name). ``png_dir`` and
``predictions.json`` then form a complete prediction set for panopticapi's ``pq_compute``.
"""

import os

from detectron2.evaluation import COCOPanopticEvaluator

from ..atomic_io import atomic_write

__all__ = ["COCOPanopticEvaluatorKeepingPNGs"]


class COCOPanopticEvaluatorKeepingPNGs(COCOPanopticEvaluator):
    """``COCOPanopticEvaluator`` that also writes the panoptic PNGs to ``png_dir``.

    Args:
        dataset_name, output_dir: as for ``COCOPanopticEvaluator``.
        png_dir: folder for the PNGs (created), e.g. ``<output_dir>/panoptic``.
    """

    def __init__(self, dataset_name, output_dir=None, *, png_dir):
        super().__init__(dataset_name, output_dir)
        self._png_dir = png_dir
        os.makedirs(png_dir, exist_ok=True)

    def process(self, inputs, outputs):
        first_new = len(self._predictions)
        super().process(inputs, outputs)
        for prediction in self._predictions[first_new:]:
            data = prediction["png_string"]
            atomic_write(
                os.path.join(self._png_dir, prediction["file_name"]), lambda f: f.write(data)
            )
