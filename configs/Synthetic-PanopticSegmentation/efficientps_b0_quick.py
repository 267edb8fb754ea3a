# LazyConfig twin of efficientps_b0_quick.yaml: EfficientPS-B0 with narrowed heads, trained from
# scratch on the built-in synthetic data (generated on first use into $DETECTRON2_DATASETS).
from ..common.data.synthetic import dataloader  # noqa: F401 (part of the config)
from ..common.models.efficientps import model
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401 (part of the config)

model.backbone.bottom_up.variant = "b0"
model.backbone.out_channels = 128
# Objects are 8-100 px in 128x192 images: anchor scale 4 instead of 8.
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (300, 100)
model.roi_heads.num_classes = 3
# 2-8 objects per image: 64 sampled ROIs (up to 16 positives) per image are plenty.
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.mask_head.conv_dims = [128, 128, 128, 128, 128]
model.sem_seg_head.num_classes = 6
model.sem_seg_head.dpc_channels = 128
model.sem_seg_head.convs_dim = 64
model.stuff_area_limit = 64  # about 0.26% of 128x192, as 2048 px is 0.1% of 1024x2048

optimizer.lr = 0.03
train.init_checkpoint = ""  # from scratch
train.max_iter = 300
train.checkpointer.period = 100
train.eval_period = 0
train.output_dir = "./output/synthetic_b0_quick_lazy"
train.seed = 1  # fixed, as SEED in the YAML twin, so that results can be reproduced
train.tta.min_sizes = [96, 128, 160]
train.tta.max_size = 256
lr_multiplier.steps = [225, 275]
lr_multiplier.warmup_iters = 100
