# LazyConfig twin of efficientps_R_50.yaml: EfficientPS on Detectron2's ResNet-50, from the MSRA
# ImageNet weights as Detectron2's own R-50 configs (BGR input, caffe pixel statistics, FrozenBN,
# stride in 1x1, stem and res2 frozen).
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from .efficientps_b5 import (  # noqa: F401 (part of the config)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

RES = ["res2", "res3", "res4", "res5"]
model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
    stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
    out_features=RES,
    freeze_at=2,
)
model.backbone.in_features = RES
model.pixel_mean = [103.530, 116.280, 123.675]
model.pixel_std = [1.0, 1.0, 1.0]
model.input_format = "BGR"  # the mappers read images in it too

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "./output/cityscapes_R_50"
