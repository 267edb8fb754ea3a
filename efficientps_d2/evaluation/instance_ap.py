"""Box and mask AP for panoptic data sets with Detectron2's "standard" panoptic metadata.

That metadata lists every class, stuff included, in ``thing_classes`` (the model's classes are
all-class contiguous ids), while COCO's instance json holds the thing categories only. Detectron2's
``COCOEvaluator`` names its per-category AP rows after ``thing_classes`` and asserts one name per
evaluated category, so on such data it fails once any detection exists. Here the names are those
of the thing categories, in the order COCO evaluates them (sorted dataset ids).
"""

from detectron2.evaluation import COCOEvaluator


class ThingCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose per-category rows cover the thing categories of the metadata."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if class_names is not None:
            id_map = self._metadata.thing_dataset_id_to_contiguous_id
            class_names = [class_names[id_map[dataset_id]] for dataset_id in sorted(id_map)]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
