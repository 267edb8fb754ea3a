# LazyConfig twin of efficientps_R_50_quick.yaml: the main job on Detectron2's ResNet-50 at half
# its width (see the YAML), with BN and nothing frozen, trained from scratch.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, BottleneckBlock, ResNet

from .efficientps_b0_quick import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

RES = ["res2", "res3", "res4", "res5"]
STEM = 32
# Per stage: blocks, first stride, bottleneck channels, output channels (ResNet-50's halved).
STAGES = [(3, 1, 32, 128), (4, 2, 64, 256), (6, 2, 128, 512), (3, 2, 256, 1024)]
model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=STEM, norm="BN"),
    stages=[
        L(ResNet.make_stage)(
            block_class=BottleneckBlock,
            num_blocks=blocks,
            stride_per_block=[stride] + [1] * (blocks - 1),
            in_channels=in_channels,
            bottleneck_channels=bottleneck,
            out_channels=out_channels,
            stride_in_1x1=True,
            norm="BN",
        )
        for (blocks, stride, bottleneck, out_channels), in_channels in zip(
            STAGES, [STEM] + [s[3] for s in STAGES[:-1]]
        )
    ],
    out_features=RES,
    freeze_at=0,
)
model.backbone.in_features = RES

train.output_dir = "./output/synthetic_R_50_quick_lazy"
