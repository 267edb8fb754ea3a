"""Semantic-segmentation metrics (mIoU) for panoptic data sets, via Detectron2's SemSegEvaluator.

Detectron2's ``SemSegEvaluator`` reads ground truth from ``sem_seg_file_name``, which "standard"
panoptic records do not have. ``PanopticSemSegEvaluator`` registers a view of the data set whose
records point ``sem_seg_file_name`` at the panoptic PNG, and gives the evaluator a loading function
that turns that PNG into all-class labels with the record's ``segments_info``.
"""

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from panopticapi.utils import rgb2id
from PIL import Image

from .atomic_outputs import AtomicOutputsMixin


def panoptic_to_semantic(pan_seg_file_name, segments_info, ignore_label):
    """All-class label map (H, W) int64 from a COCO-format panoptic PNG and its segments.

    Pixels of void (id 0) or of ids missing from ``segments_info`` get ``ignore_label``.
    """
    with Image.open(pan_seg_file_name) as image:
        ids = rgb2id(np.asarray(image.convert("RGB"), dtype=np.uint32))
    labels = np.full(ids.shape, ignore_label, dtype=np.int64)
    for segment in segments_info:
        labels[ids == segment["id"]] = segment["category_id"]
    return labels


class PanopticSemSegEvaluator(AtomicOutputsMixin, SemSegEvaluator):
    """``SemSegEvaluator`` for a data set registered in Detectron2's "standard" panoptic form.

    Reports mIoU, fwIoU, pixel accuracy (and per-class IoU) over all classes, stuff and things.
    Its files are replaced whole (see :class:`~.atomic_outputs.AtomicOutputsMixin`).
    """

    STAGED_NAME = "sem_seg_predictions.json"

    def __init__(self, dataset_name, distributed=True, output_dir=None):
        view_name = f"{dataset_name}__semantic_from_panoptic"
        records = DatasetCatalog.get(dataset_name)
        segments_by_png = {r["pan_seg_file_name"]: r["segments_info"] for r in records}
        meta = MetadataCatalog.get(dataset_name)
        ignore_label = meta.get("ignore_label", 255)
        if view_name not in DatasetCatalog.list():
            DatasetCatalog.register(
                view_name,
                lambda: [
                    {"file_name": r["file_name"], "sem_seg_file_name": r["pan_seg_file_name"]}
                    for r in DatasetCatalog.get(dataset_name)
                ],
            )
            # Both maps together cover every class; SemSegEvaluator's json output needs all.
            all_classes = dict(meta.get("stuff_dataset_id_to_contiguous_id", {}))
            all_classes.update(meta.get("thing_dataset_id_to_contiguous_id", {}))
            MetadataCatalog.get(view_name).set(
                stuff_classes=meta.stuff_classes,
                ignore_label=ignore_label,
                stuff_dataset_id_to_contiguous_id=all_classes,
            )

        def load_labels(pan_seg_file_name, dtype=int):
            segments = segments_by_png[pan_seg_file_name]
            return panoptic_to_semantic(pan_seg_file_name, segments, ignore_label).astype(dtype)

        super().__init__(
            view_name,
            distributed=distributed,
            output_dir=output_dir,
            sem_seg_loading_fn=load_labels,
        )
