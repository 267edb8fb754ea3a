"""Detectron2's COCOPanopticEvaluator with one prediction PNG per image, optionally kept.

``COCOPanopticEvaluator`` names each image's prediction PNG after the image's file name without
its folder, so two images of the same name in different folders (``a/0001.jpg``,
``b/0001.jpg``) shared one PNG, the last one written, and the other image was scored against it:
silently wrong numbers (ground truth given as the prediction scored PQ 94, not 100).
:class:`PanopticEvaluator` gathers the predictions of every process first, then gives such
images names of their own (the image id appended: ``0001_<image_id>.png``); the others keep
Detectron2's names.

``predictions.json`` is written atomically: Detectron2's ``evaluate()`` writes it in place (a
kill mid-write left it truncated); here it writes it into a hidden folder inside ``output_dir``,
from which it is renamed into place. With ``png_dir`` the evaluator also keeps the PNGs it
scores, which ``COCOPanopticEvaluator`` writes to a temporary folder that ``evaluate()``
deletes: they are written to ``png_dir`` as one folder that replaces the previous evaluation's,
followed at once by ``predictions.json`` (an interrupted or failed evaluation leaves the
previous folder and json whole, never a mix of two evaluations; the next one removes what it
left behind). ``png_dir`` and ``predictions.json`` then form a complete prediction set for
panopticapi's ``pq_compute``.
"""

import itertools
import logging
import os
from collections import defaultdict

import detectron2.utils.comm as comm
from detectron2.evaluation import COCOPanopticEvaluator

from ..atomic_io import atomic_directory, remove_stale_temporaries_of
from .atomic_outputs import staged_output_dir

__all__ = ["PanopticEvaluator", "unique_png_names"]

logger = logging.getLogger(__name__)


def unique_png_names(predictions):
    """Renames, in place, the ``file_name`` of predictions (dicts with ``file_name`` and
    ``image_id``) that more than one image would write: ``<stem>_<image_id>.png``, in the order
    of the image ids, whatever the order of ``predictions``. Returns how many were renamed."""
    by_name = defaultdict(list)
    for prediction in predictions:
        by_name[prediction["file_name"]].append(prediction)
    taken, renamed = set(by_name), 0
    for name, group in by_name.items():
        if len({str(p["image_id"]) for p in group}) < 2:
            continue
        stem, ext = os.path.splitext(name)
        for prediction in sorted(group, key=lambda p: str(p["image_id"])):
            image_id = str(prediction["image_id"]).replace(os.sep, "_")
            new, k = f"{stem}_{image_id}{ext}", 1
            while new in taken:  # another image's own name
                new, k = f"{stem}_{image_id}_{k}{ext}", k + 1
            taken.add(new)
            prediction["file_name"] = new
            renamed += 1
    return renamed


class PanopticEvaluator(COCOPanopticEvaluator):
    """``COCOPanopticEvaluator`` (PQ) with one prediction PNG per image, kept in ``png_dir`` when
    given (see the module docstring).

    Args:
        dataset_name, output_dir: as for ``COCOPanopticEvaluator``.
        png_dir: folder to keep the PNGs in (replaced at each evaluation), e.g.
            ``<output_dir>/panoptic``; None keeps none. Kept only with an ``output_dir``.
    """

    def __init__(self, dataset_name, output_dir=None, *, png_dir=None):
        super().__init__(dataset_name, output_dir)
        self._png_dir = png_dir

    def evaluate(self):
        # The predictions are gathered here, to be named. Detectron2's evaluate() gathers again,
        # which every process must join: the others hand it nothing, the main process the named
        # list (with several processes, torch pickles it once more: a passing copy).
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        if not comm.is_main_process():
            self._predictions = []
            return super().evaluate()
        renamed = unique_png_names(predictions)
        if renamed:
            logger.warning(
                f"{renamed} images share a file name with another image of a different "
                "folder: their panoptic PNGs are named after their image ids."
            )
        self._predictions = predictions
        if not self._output_dir:
            return super().evaluate()
        return self._evaluate_into(predictions)

    def _evaluate_into(self, predictions):
        """Detectron2's evaluate() with its ``predictions.json`` written into a hidden folder of
        the output folder, then renamed into place: after the PNG folder with ``png_dir``, each
        replaced whole (see the module docstring)."""
        if self._png_dir is not None:
            # Only the main process writes it: what a killed evaluation left of it is stale
            # (staged_output_dir does the same for predictions.json).
            remove_stale_temporaries_of(self._png_dir)
        # Detectron2 writes only predictions.json into its output folder (its PNGs go to a
        # temporary folder of the system's).
        with staged_output_dir(self, "predictions.json") as move_json:
            if self._png_dir is None:
                results = super().evaluate()
                move_json()
                return results
            with atomic_directory(self._png_dir, overwrite=True, then=move_json) as folder:
                os.makedirs(folder)
                for prediction in predictions:  # before Detectron2 takes their bytes
                    with open(os.path.join(folder, prediction["file_name"]), "wb") as f:
                        f.write(prediction["png_string"])
                results = super().evaluate()
            return results
