# The built-in synthetic panoptic data (6 classes, 3 things, 128x192 images), made on first use.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .panoptic import panoptic_dataloader

dataloader = panoptic_dataloader(
    train="synthetic_panoptic_train",
    test="synthetic_panoptic_val",
    train_augmentations=[
        L(T.ResizeShortestEdge)(
            short_edge_length=(112, 128, 144, 160), max_size=256, sample_style="choice"
        ),
        L(T.RandomFlip)(horizontal=True, vertical=False),
    ],
    test_augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192)],
    batch_size=8,
    # Loading a batch takes 40 ms; a worker would contend with training for the 2 cores.
    num_workers=0,
)
