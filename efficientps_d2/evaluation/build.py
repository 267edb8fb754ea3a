"""Chooses Detectron2's evaluators for a data set from its ``evaluator_type``, and the instance AP
evaluator for panoptic metadata."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from .atomic_outputs import AtomicOutputsMixin
from .cityscapes_compat import CompatCityscapesInstanceEvaluator, CompatCityscapesSemSegEvaluator
from .panoptic_pngs import PanopticEvaluator
from .panoptic_sem_seg import PanopticSemSegEvaluator

SUPPORTED = ("coco_panoptic_seg", "cityscapes_panoptic_seg")
# COCO's object size ranges (area in pixels): small < 32^2 <= medium < 96^2 <= large.
_SMALL, _LARGE = 32**2, 96**2


class ThingCOCOEvaluator(AtomicOutputsMixin, COCOEvaluator):
    """``COCOEvaluator`` whose per-category rows cover the thing categories of the metadata, and
    whose files are replaced whole (see :class:`~.atomic_outputs.AtomicOutputsMixin`).

    Box and mask AP for panoptic data sets with Detectron2's "standard" panoptic metadata, which
    lists every class, stuff included, in ``thing_classes`` (the model's classes are all-class
    contiguous ids), while COCO's instance json holds the thing categories only. Detectron2's
    ``COCOEvaluator`` names its per-category AP rows after ``thing_classes`` and asserts one name
    per evaluated category, so on such data it fails once any detection exists. Here the names are
    those of the thing categories, in the order COCO evaluates them (sorted dataset ids).

    With no detection at all, Detectron2 reports AP nan; when the ground truth has instances, the
    right score is 0 (every instance is missed), reported here with a warning. Size ranges without
    ground-truth instances stay nan, as COCO reports them.
    """

    STAGED_NAME = "coco_instances_results.json"

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is None and iou_type in ("bbox", "segm"):
            return self._no_detections(iou_type)
        if class_names is not None:
            id_map = self._metadata.thing_dataset_id_to_contiguous_id
            class_names = [class_names[id_map[dataset_id]] for dataset_id in sorted(id_map)]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)

    def _no_detections(self, iou_type):
        areas = [
            a.get("area", 0)
            for a in self._coco_api.loadAnns(self._coco_api.getAnnIds())
            if not a.get("iscrowd", 0)
        ]
        if not areas:  # nothing to find either: undefined
            return super()._derive_coco_results(None, iou_type)
        sizes = {
            "APs": any(a < _SMALL for a in areas),
            "APm": any(_SMALL <= a < _LARGE for a in areas),
            "APl": any(a >= _LARGE for a in areas),
        }
        self._logger.warning(
            f"No {iou_type} detections for the {len(areas)} ground-truth instances: AP is 0."
        )
        results = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        results.update({k: 0.0 if present else float("nan") for k, present in sizes.items()})
        return results


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Panoptic quality, plus semantic mIoU and instance AP where the data set allows.

    - "coco_panoptic_seg" (COCO panoptic, custom and synthetic data): PanopticEvaluator (PQ:
      Detectron2's COCOPanopticEvaluator, one prediction PNG per image),
      PanopticSemSegEvaluator (mIoU), and ThingCOCOEvaluator (box/mask AP) when the metadata
      names an instance json (``json_file``).
    - "cityscapes_panoptic_seg": PanopticEvaluator, CityscapesSemSegEvaluator and
      CityscapesInstanceEvaluator (the official Cityscapes scripts; see ``cityscapes_compat``).

    With TEST.KEEP_PANOPTIC_PNGS the panoptic PNGs stay in ``<output_folder>/panoptic/``, next to
    ``predictions.json``, instead of a deleted temporary folder.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return build_dataset_evaluator(
        dataset_name, output_folder, keep_panoptic_pngs=cfg.TEST.KEEP_PANOPTIC_PNGS
    )


def build_dataset_evaluator(dataset_name, output_folder, *, keep_panoptic_pngs=False):
    """:func:`build_evaluator` without a config (for LazyConfig files); ``dataset_name`` may be a
    one-element list, as ``get_detection_dataset_dicts`` takes. What it cannot evaluate is
    refused as by :func:`check_evaluable`."""
    dataset_name = check_evaluable(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type")
    if evaluator_type == "coco_panoptic_seg":
        evaluators = [
            _panoptic_evaluator(keep_panoptic_pngs, dataset_name, output_folder),
            PanopticSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
        ]
        if meta.get("json_file") and os.path.isfile(meta.json_file):
            evaluators.append(
                ThingCOCOEvaluator(
                    dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder
                )
            )
    else:  # "cityscapes_panoptic_seg": check_evaluable refused the other types
        evaluators = [
            _panoptic_evaluator(keep_panoptic_pngs, dataset_name, output_folder),
            CompatCityscapesSemSegEvaluator(dataset_name),
            CompatCityscapesInstanceEvaluator(dataset_name),
        ]
    return DatasetEvaluators(evaluators)


def check_evaluable(dataset_name, key=None):
    """Refuses what :func:`build_dataset_evaluator` cannot evaluate, before anything is built;
    returns the data set's name. ``dataset_name``: a name or a one-element list of one (more are
    refused with ValueError: one data set at a time); its ``evaluator_type`` must be one of
    :data:`SUPPORTED` (NotImplementedError otherwise). ``key``: the config key that names the
    data sets, named in the messages (the data check passes it)."""
    if not isinstance(dataset_name, str):
        names = list(dataset_name)
        if len(names) != 1:
            raise ValueError(
                f"{f'{key} names' if key else 'Got'} {len(names)} data sets {names}, but "
                "EfficientPS's evaluator (build_dataset_evaluator) scores one: evaluate them one "
                "run at a time."
            )
        (dataset_name,) = names
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in SUPPORTED:
        raise NotImplementedError(
            f"{f'{key} names data set' if key else 'Data set'} '{dataset_name}' of evaluator_type "
            f"{evaluator_type!r}, which EfficientPS does not evaluate (panoptic data sets of type "
            f"{list(SUPPORTED)}; register yours with "
            "efficientps_d2.data.register_panoptic_dataset)."
        )
    return dataset_name


def _panoptic_evaluator(keep_panoptic_pngs, dataset_name, output_folder):
    # Detectron2's, with one prediction PNG per image also where images of different folders
    # share a file name (see panoptic_pngs).
    png_dir = os.path.join(output_folder, "panoptic") if keep_panoptic_pngs else None
    return PanopticEvaluator(dataset_name, output_folder, png_dir=png_dir)
