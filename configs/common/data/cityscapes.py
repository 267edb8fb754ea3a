# Cityscapes fine panoptic (19 classes, 8 things): random scale 0.5-2.0 around 1024x2048, then a
# 1024x2048 crop, then horizontal flip, as the paper; a scaled image smaller than the crop is not
# padded to it (the batch pads it; its own size is what the hard-pixel loss takes its quarter of).
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .panoptic import panoptic_dataloader

dataloader = panoptic_dataloader(
    train="cityscapes_fine_panoptic_train",
    test="cityscapes_fine_panoptic_val",
    train_augmentations=[
        L(T.ResizeScale)(min_scale=0.5, max_scale=2.0, target_height=1024, target_width=2048),
        L(T.FixedSizeCrop)(crop_size=(1024, 2048), pad=False),
        L(T.RandomFlip)(horizontal=True, vertical=False),
    ],
    test_augmentations=[L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=2048)],
    batch_size=16,
)
