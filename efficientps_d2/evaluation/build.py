"""Chooses Detectron2's evaluators for a data set from its ``evaluator_type``, and the instance AP
evaluator for panoptic metadata."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators

from .cityscapes_compat import CompatCityscapesInstanceEvaluator, CompatCityscapesSemSegEvaluator
from .panoptic_pngs import COCOPanopticEvaluatorKeepingPNGs
from .panoptic_sem_seg import PanopticSemSegEvaluator

SUPPORTED = ("coco_panoptic_seg", "cityscapes_panoptic_seg")


class ThingCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose per-category rows cover the thing categories of the metadata.

    Box and mask AP for panoptic data sets with Detectron2's "standard" panoptic metadata, which
    lists every class, stuff included, in ``thing_classes`` (the model's classes are all-class
    contiguous ids), while COCO's instance json holds the thing categories only. Detectron2's
    ``COCOEvaluator`` names its per-category AP rows after ``thing_classes`` and asserts one name
    per evaluated category, so on such data it fails once any detection exists. Here the names are
    those of the thing categories, in the order COCO evaluates them (sorted dataset ids).
    """

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if class_names is not None:
            id_map = self._metadata.thing_dataset_id_to_contiguous_id
            class_names = [class_names[id_map[dataset_id]] for dataset_id in sorted(id_map)]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Panoptic quality, plus semantic mIoU and instance AP where the data set allows.

    - "coco_panoptic_seg" (COCO panoptic, custom and synthetic data): COCOPanopticEvaluator (PQ),
      PanopticSemSegEvaluator (mIoU), and ThingCOCOEvaluator (box/mask AP) when the metadata
      names an instance json (``json_file``).
    - "cityscapes_panoptic_seg": COCOPanopticEvaluator, CityscapesSemSegEvaluator and
      CityscapesInstanceEvaluator (the official Cityscapes scripts; see ``cityscapes_compat``).

    With TEST.KEEP_PANOPTIC_PNGS the panoptic PNGs stay in ``<output_folder>/panoptic/``, next to
    ``predictions.json``, instead of a deleted temporary folder.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type")
    if evaluator_type == "coco_panoptic_seg":
        evaluators = [
            _panoptic_evaluator(cfg, dataset_name, output_folder),
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
            _panoptic_evaluator(cfg, dataset_name, output_folder),
            CompatCityscapesSemSegEvaluator(dataset_name),
            CompatCityscapesInstanceEvaluator(dataset_name),
        ]
    else:
        raise NotImplementedError(
            f"Data set '{dataset_name}' has evaluator_type '{evaluator_type}'; EfficientPS "
            f"evaluates panoptic data sets of type {list(SUPPORTED)} (register yours with "
            "efficientps_d2.data.register_panoptic_dataset)."
        )
    return DatasetEvaluators(evaluators)


def _panoptic_evaluator(cfg, dataset_name, output_folder):
    if cfg.TEST.KEEP_PANOPTIC_PNGS:
        return COCOPanopticEvaluatorKeepingPNGs(
            dataset_name, output_folder, png_dir=os.path.join(output_folder, "panoptic")
        )
    return COCOPanopticEvaluator(dataset_name, output_folder)
