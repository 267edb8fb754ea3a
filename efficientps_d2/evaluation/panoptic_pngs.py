"""Detectron2's COCOPanopticEvaluator with one prediction PNG per image, optionally kept.

``COCOPanopticEvaluator`` names each image's prediction PNG after the image's file name without
its folder, so two images of the same name in different folders (``a/0001.jpg``,
``b/0001.jpg``) shared one PNG, the last one written, and the other image was scored against it:
silently wrong numbers (ground truth given as the prediction scored PQ 94, not 100).
:class:`PanopticEvaluator` gathers the predictions of every process first, then gives such
images names of their own (the image id appended: ``0001_<image_id>.png``); the others keep
Detectron2's names.

``predictions.json`` is written atomically (Detectron2 writes it in place: a kill mid-write
left it truncated). With ``png_dir`` the evaluator also keeps the PNGs it scores, which
``COCOPanopticEvaluator`` writes to a temporary folder that ``evaluate()`` deletes: they are
written to ``png_dir`` as one folder that replaces the previous evaluation's, followed at once
by ``predictions.json`` (atomically: an interrupted evaluation leaves the previous folder and
json whole, never a mix of two evaluations; the next one removes what it left behind).
``png_dir`` and ``predictions.json`` then form a complete prediction set for panopticapi's
``pq_compute``.
"""

import itertools
import json
import logging
import os
from collections import defaultdict

import detectron2.utils.comm as comm
from detectron2.evaluation import COCOPanopticEvaluator

from ..atomic_io import atomic_directory, atomic_write, remove_stale_temporaries

__all__ = ["COCOPanopticEvaluatorKeepingPNGs", "PanopticEvaluator", "unique_png_names"]

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
            ``<output_dir>/panoptic``; None keeps none.
    """

    def __init__(self, dataset_name, output_dir=None, *, png_dir=None):
        super().__init__(dataset_name, output_dir)
        self._png_dir = png_dir

    def evaluate(self):
        # Detectron2 gathers the predictions in evaluate(); they are gathered here first, named,
        # and handed to it on the main process only (its gather then adds nothing).
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        self._predictions = predictions if comm.is_main_process() else []
        output_dir = self._output_dir
        if comm.is_main_process():
            renamed = unique_png_names(predictions)
            if renamed:
                logger.warning(
                    f"{renamed} images share a file name with another image of a different "
                    "folder: their panoptic PNGs are named after their image ids."
                )
            if output_dir:
                self._write_outputs(predictions, output_dir)
        # Detectron2 writes predictions.json in place (a kill mid-write truncates it); here it is
        # written above, and Detectron2's copy goes to its temporary folder.
        self._output_dir = None
        try:
            return super().evaluate()
        finally:
            self._output_dir = output_dir

    def _write_outputs(self, predictions, output_dir):
        """``predictions.json`` (the ground-truth json with the predictions as its annotations,
        as Detectron2 writes it) and, with ``png_dir``, the PNGs, each replaced whole."""
        with open(self._metadata.panoptic_json) as f:
            data = json.load(f)
        data["annotations"] = [
            {k: v for k, v in p.items() if k != "png_string"} for p in predictions
        ]
        path = os.path.join(output_dir, "predictions.json")
        # Only the main process writes these: what a killed evaluation left of them is stale.
        remove_stale_temporaries(output_dir, target="predictions.json")

        def write_json():
            atomic_write(path, lambda f: f.write(json.dumps(data)), mode="w")

        if self._png_dir is None:
            write_json()
            return
        parent, name = os.path.split(os.path.abspath(self._png_dir))
        remove_stale_temporaries(parent, target=name)
        with atomic_directory(self._png_dir, overwrite=True, then=write_json) as folder:
            os.makedirs(folder)
            for prediction in predictions:
                with open(os.path.join(folder, prediction["file_name"]), "wb") as f:
                    f.write(prediction["png_string"])


class COCOPanopticEvaluatorKeepingPNGs(PanopticEvaluator):
    """:class:`PanopticEvaluator` that keeps its PNGs in ``png_dir`` (required)."""

    def __init__(self, dataset_name, output_dir=None, *, png_dir):
        super().__init__(dataset_name, output_dir, png_dir=png_dir)
