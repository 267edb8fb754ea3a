"""Detectron2 evaluators whose files never end up half-written or from two evaluations.

``COCOEvaluator.evaluate()`` writes ``instances_predictions.pth`` and then
``coco_instances_results.json``, ``SemSegEvaluator.evaluate()`` ``sem_seg_predictions.json`` and
then ``sem_seg_evaluation.pth``, each in place in its output folder: a kill or Ctrl-C while one is
written (hundreds of MB on COCO) left it truncated over the previous evaluation's, or left the
first file new and the second old. With :class:`AtomicOutputsMixin` they are written into a
hidden folder inside the output folder, and renamed into place when ``evaluate()`` returns, as
:class:`~efficientps_d2.evaluation.PanopticEvaluator` does for ``predictions.json``. The next
evaluation removes what a killed one left there.
"""

import contextlib

import detectron2.utils.comm as comm

from ..atomic_io import staged_folder

__all__ = ["AtomicOutputsMixin", "staged_output_dir"]


@contextlib.contextmanager
def staged_output_dir(evaluator, name):
    """For the block, ``evaluator._output_dir`` is the staging folder of
    :func:`~efficientps_d2.atomic_io.staged_folder` (``name`` names it); yields its ``commit()``,
    which moves the files written there into the output folder."""
    output_dir = evaluator._output_dir
    with staged_folder(output_dir, name) as (staging, commit):
        evaluator._output_dir = staging
        try:
            yield commit
        finally:
            evaluator._output_dir = output_dir


class AtomicOutputsMixin:
    """Mixin (listed before the Detectron2 evaluator) for an evaluator that writes its files into
    ``self._output_dir`` in ``evaluate()``: they are written into a hidden folder there (named as
    the temporaries of ``STAGED_NAME``), then each file is flushed to disk and renamed into the
    output folder. An error or interrupt leaves the previous evaluation's files as they were. A
    kill during the renames (a moment) can leave some files new and the others old, each whole.
    """

    STAGED_NAME = "evaluation"  # names the hidden folder: one name per evaluator of a folder

    def evaluate(self, *args, **kwargs):
        if not self._output_dir or not comm.is_main_process():  # only the main process writes
            return super().evaluate(*args, **kwargs)
        with staged_output_dir(self, self.STAGED_NAME) as commit:
            results = super().evaluate(*args, **kwargs)
            commit()
            return results
