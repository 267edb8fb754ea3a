# COCO panoptic (133 classes, 80 things) with Detectron2's multi-scale training sizes.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .panoptic import panoptic_dataloader

dataloader = panoptic_dataloader(
    train="coco_2017_train_panoptic",
    test="coco_2017_val_panoptic",
    train_augmentations=[
        L(T.ResizeShortestEdge)(
            short_edge_length=(640, 672, 704, 736, 768, 800), max_size=1333, sample_style="choice"
        ),
        L(T.RandomFlip)(horizontal=True, vertical=False),
    ],
    test_augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
    batch_size=16,
)
