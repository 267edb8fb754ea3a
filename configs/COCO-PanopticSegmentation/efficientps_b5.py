# LazyConfig twin of efficientps_b5.yaml: EfficientPS-B5 on COCO panoptic (133 classes, 80
# things), with the schedule of Detectron2's Panoptic FPN 3x and the paper's optimizer.
from ..common.data.coco import dataloader  # noqa: F401 (part of the config)
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
model.sem_seg_head.num_classes = 133
model.roi_heads.num_classes = 80
model.stuff_area_limit = 4096  # Detectron2's Panoptic FPN value for COCO's smaller images

optimizer.lr = 0.02
train.init_checkpoint = "torchvision://efficientnet_b5"
train.max_iter = 270000
train.checkpointer.period = 10000
train.eval_period = 0
train.output_dir = "./output/coco_b5"
# Reading all 123k panoptic PNGs before each run takes ~20 min on one core (10 ms per PNG): the
# start-up check reads the json only. Check the PNGs once with
# `python -m efficientps_d2.data.check coco_2017_train_panoptic coco_2017_val_panoptic`.
train.check_pngs = False
lr_multiplier.steps = [210000, 250000]
