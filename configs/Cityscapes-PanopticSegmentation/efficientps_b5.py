# LazyConfig twin of efficientps_b5.yaml: EfficientPS-B5 on Cityscapes fine, the paper's setting
# (16 GPUs, 1 image each, synchronised BN), from torchvision's ImageNet weights.
from ..common.data.cityscapes import dataloader  # noqa: F401 (part of the config)
from ..common.models.efficientps import model
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401 (part of the config)

for _norm_owner in (
    model.backbone.bottom_up,
    model.backbone,
    model.sem_seg_head,
    model.proposal_generator.head,
):
    _norm_owner.norm = "SyncBN"
# Detectron2's count-weighted synchronised BN, which takes a process without foreground ROIs
# (an image without things): torch's SyncBatchNorm cannot (see the YAML twin).
model.roi_heads.mask_head.conv_norm = "naiveSyncBN_N"
model.sem_seg_head.num_classes = 19  # train ids 0-10 stuff, 11-18 things
model.roi_heads.num_classes = 8

train.init_checkpoint = "torchvision://efficientnet_b5"
# About 160 epochs of the 2975 training images, decayed 10x at 75% and 90%.
train.max_iter = 30000
train.checkpointer.period = 2000
train.eval_period = 5000
train.output_dir = "./output/cityscapes_b5"
lr_multiplier.steps = [22500, 27000]
