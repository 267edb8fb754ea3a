# LazyConfig twin of efficientps_b0_512x1024.yaml: B0 trunk, 512x1024 crops, plain BN.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .efficientps_b5 import lr_multiplier  # noqa: F401 (part of the config)
from .efficientps_b5 import dataloader, model, optimizer, train

model.backbone.bottom_up.variant = "b0"
for _norm_owner in (
    model.backbone.bottom_up,
    model.backbone,
    model.sem_seg_head,
    model.proposal_generator.head,
):
    _norm_owner.norm = "BN"
model.roi_heads.mask_head.conv_norm = "BN"

dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.5, max_scale=2.0, target_height=512, target_width=1024),
    L(T.FixedSizeCrop)(crop_size=(512, 1024), pad=False),
    L(T.RandomFlip)(horizontal=True, vertical=False),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=512, max_size=1024)
]
dataloader.train.total_batch_size = 8
optimizer.lr = 0.035
train.init_checkpoint = "torchvision://efficientnet_b0"
train.output_dir = "./output/cityscapes_b0_512x1024"
