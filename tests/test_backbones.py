"""The 2-way FPN on other bottom-up backbones: Detectron2's ResNet, a user's own (RegNet), and
clear refusals of backbones that cannot feed it."""

import pickle

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone, build_model
from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem
from detectron2.utils.events import EventStorage
from torch import nn

from efficientps_d2.checkpoint import EfficientPSCheckpointer
from tests.common import (
    LOSS_NAMES,
    PERMISSIVE,
    THING_SEMANTIC_IDS,
    assert_p2_to_p5,
    load_config,
    tiny_config,
    training_input,
)

RES = ["res2", "res3", "res4", "res5"]
# ResNet-50's depth at 1/8 of its width, for tests in seconds.
TINY_R50 = [
    "MODEL.BACKBONE.NAME", "build_two_way_fpn_backbone",
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.TWO_WAY_FPN.BOTTOM_UP", "build_resnet_backbone",
    "MODEL.TWO_WAY_FPN.IN_FEATURES", RES,
    "MODEL.RESNETS.DEPTH", 50,
    "MODEL.RESNETS.OUT_FEATURES", RES,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
]  # fmt: skip


class _Toy(Backbone):
    """A user's backbone: one stride-2 conv per output, at the given strides."""

    def __init__(self, strides):
        super().__init__()
        self.strides = strides
        self.convs = nn.ModuleList(
            nn.Conv2d(3, 8, 3, stride=s, padding=1) for s in strides
        )  # channels 8; stride s straight from the image: a test stand-in, not a real network

    def forward(self, x):
        return {f"s{s}": conv(x) for s, conv in zip(self.strides, self.convs)}

    def output_shape(self):
        return {f"s{s}": ShapeSpec(channels=8, stride=s) for s in self.strides}


@BACKBONE_REGISTRY.register()
def _test_toy_backbone_strides_8_to_64(cfg, input_shape):
    return _Toy([8, 16, 32, 64])


@BACKBONE_REGISTRY.register()
def _test_tiny_regnet_backbone(cfg, input_shape):
    """How a user puts Detectron2's RegNet (not registered for yacs configs) under the FPN."""
    return RegNet(
        stem_class=SimpleStem,
        stem_width=16,
        block_class=ResBottleneckBlock,
        depth=5,  # widths 8, 16, 32, 64 at strides 4, 8, 16, 32
        w_a=12.0,
        w_0=8,
        w_m=2.0,
        group_width=8,
        norm="BN",
        out_features=["s1", "s2", "s3", "s4"],
    )


def test_resnet_under_the_fpn_gives_p2_to_p5_with_bottom_up_parameter_names():
    backbone = build_backbone(tiny_config(TINY_R50)).eval()
    assert type(backbone.bottom_up).__name__ == "ResNet"
    assert_p2_to_p5(backbone)
    names = list(backbone.state_dict())
    assert "bottom_up.stem.conv1.weight" in names and "bottom_up.res5.2.conv3.weight" in names


def test_both_builders_give_efficientnet_the_same_parameters():
    old = build_backbone(
        tiny_config(["MODEL.BACKBONE.NAME", "build_efficientnet_two_way_fpn_backbone"])
    )
    new = build_backbone(tiny_config(["MODEL.BACKBONE.NAME", "build_two_way_fpn_backbone"]))
    assert {k: v.shape for k, v in old.state_dict().items()} == {
        k: v.shape for k, v in new.state_dict().items()
    }
    # The EfficientNet-only builder refuses another bottom-up rather than ignoring it.
    cfg = tiny_config(TINY_R50 + ["MODEL.BACKBONE.NAME", "build_efficientnet_two_way_fpn_backbone"])
    with pytest.raises(ValueError, match="BOTTOM_UP is 'build_resnet_backbone'.*build_two_way_fpn"):
        build_backbone(cfg)


@pytest.mark.parametrize(
    "opts, found, problem",
    [
        # ResNet without res2 (stride 4).
        (
            ["MODEL.RESNETS.OUT_FEATURES", RES[1:]],
            "'res3' (stride 8), 'res4' (stride 16), 'res5' (stride 32)",
            "does not output ['res2']",
        ),
        # ResNet's features named but not finest first.
        (
            ["MODEL.TWO_WAY_FPN.IN_FEATURES", ["res3", "res2", "res4", "res5"]],
            "'res2' (stride 4)",
            "strides [8, 4, 16, 32]",
        ),
        # A user's backbone with strides 8-64.
        (
            [
                "MODEL.TWO_WAY_FPN.BOTTOM_UP",
                "_test_toy_backbone_strides_8_to_64",
                "MODEL.TWO_WAY_FPN.IN_FEATURES",
                ["s8", "s16", "s32", "s64"],
            ],
            "'s8' (stride 8), 's16' (stride 16), 's32' (stride 32), 's64' (stride 64)",
            "strides [8, 16, 32, 64]",
        ),
    ],
)
def test_backbone_without_the_needed_strides_is_refused(opts, found, problem):
    with pytest.raises(ValueError) as e:
        build_backbone(tiny_config(TINY_R50 + opts))
    message = str(e.value)
    assert "MODEL.TWO_WAY_FPN.IN_FEATURES" in message and "strides [4, 8, 16, 32]" in message
    assert found in message and problem in message


@pytest.mark.parametrize("name", ["build_no_such_backbone", "build_two_way_fpn_backbone"])
def test_bottom_up_must_be_a_registered_bottom_up_builder(name):
    cfg = tiny_config(TINY_R50 + ["MODEL.TWO_WAY_FPN.BOTTOM_UP", name])
    with pytest.raises(ValueError, match=f"MODEL.TWO_WAY_FPN.BOTTOM_UP.*'{name}'.*") as e:
        build_backbone(cfg)
    assert "'build_resnet_backbone'" in str(e.value)  # the registered ones are listed


@BACKBONE_REGISTRY.register()
def _test_builder_of_a_plain_module(cfg, input_shape):
    return nn.Sequential(nn.Conv2d(3, 8, 3))


def test_bottom_up_builder_must_return_a_backbone():
    cfg = tiny_config(TINY_R50 + ["MODEL.TWO_WAY_FPN.BOTTOM_UP", "_test_builder_of_a_plain_module"])
    with pytest.raises(ValueError, match="'_test_builder_of_a_plain_module' returned a Sequential"):
        build_backbone(cfg)


def _check_model(cfg):
    """A training step with gradients in the bottom-up network, then EfficientPS's inference
    output contract (as tests/test_model.py checks it for EfficientNet)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [training_input(64, 96, [[10, 12, 40, 50], [50, 20, 90, 60]], [0, 1])]
    with EventStorage():
        losses = model(batch)
    assert set(losses) == LOSS_NAMES
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.bottom_up.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"], "height": 32, "width": 48}])
    assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 32, 48)
    assert len(out["instances"]) > 0 and out["instances"].pred_masks.shape[1:] == (32, 48)
    assert set(out["instances"].pred_classes.tolist()) <= set(THING_SEMANTIC_IDS)
    panoptic_seg, segments_info = out["panoptic_seg"]
    assert panoptic_seg.dtype == torch.int32 and panoptic_seg.shape == (32, 48)
    assert set(panoptic_seg.unique().tolist()) - {0} == {s["id"] for s in segments_info}
    return model, batch[0]["image"], out


def test_resnet_model_trains_and_keeps_the_output_contract_also_on_the_fast_path():
    plain = ["MODEL.EFFICIENTPS.FAST_INFERENCE", False]
    model, image, out = _check_model(tiny_config(TINY_R50 + PERMISSIVE + plain))
    # BatchNorm folding covers ResNet's convs too: the fast path gives the plain path's outputs.
    model.fast_inference = True
    with torch.no_grad():
        (fast,) = model([{"image": image, "height": 32, "width": 48}])
    torch.testing.assert_close(fast["sem_seg"], out["sem_seg"], rtol=1e-3, atol=1e-3)


def test_a_user_registered_backbone_works():
    opts = [
        "MODEL.BACKBONE.NAME", "build_two_way_fpn_backbone",
        "MODEL.TWO_WAY_FPN.BOTTOM_UP", "_test_tiny_regnet_backbone",
        "MODEL.TWO_WAY_FPN.IN_FEATURES", ["s1", "s2", "s3", "s4"],
    ]  # fmt: skip
    model, _, _ = _check_model(tiny_config(opts + PERMISSIVE))
    assert type(model.backbone.bottom_up).__name__ == "RegNet"


def _msra_name(name):
    """Detectron2 ResNet parameter name -> its name in Detectron2's ImageNetPretrained/MSRA pkls
    (the inverse of the renaming that Detectron2's checkpointer applies to them)."""
    norm = {"weight": "_bn_s", "bias": "_bn_b"}
    parts = name.split(".")
    if parts[0] == "stem":  # stem.conv1.weight, stem.conv1.norm.{weight,bias}
        return "conv1_w" if len(parts) == 3 else "res_conv1" + norm[parts[-1]]
    stage, block, conv, *rest = parts  # e.g. res3.0.shortcut.norm.bias
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
    prefix = f"{stage}_{block}_{branch[conv]}"
    return prefix + (norm[rest[1]] if rest[0] == "norm" else "_w")


def test_msra_imagenet_pkl_initialises_the_resnet(tmp_path):
    """MODEL.WEIGHTS "detectron2://ImageNetPretrained/MSRA/R-50.pkl" (efficientps_R_50.yaml) is a
    caffe2 pkl of "blobs"; here a small one in that format, as no download is possible."""
    cfg = tiny_config(TINY_R50 + ["MODEL.RESNETS.NORM", "FrozenBN"])
    model = build_model(cfg)
    torch.manual_seed(1)
    trunk = {
        k: torch.randn(v.shape)
        for k, v in model.backbone.bottom_up.state_dict().items()
        if not k.endswith(("running_mean", "running_var"))  # MSRA pkls fold them into the affine
    }
    blobs = {_msra_name(k): v.numpy() for k, v in trunk.items()}
    blobs["fc1000_w"] = np.zeros((1000, 256), np.float32)  # the classifier, unused
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))
    heads_before = {k: v.clone() for k, v in model.sem_seg_head.state_dict().items()}

    # As train_net.py loads MODEL.WEIGHTS: partial weights refused, except ImageNet backbones.
    checkpointer = EfficientPSCheckpointer(model, allow_missing=False)
    checkpointer.load(str(path))
    loaded = model.backbone.bottom_up.state_dict()
    for k, v in trunk.items():
        torch.testing.assert_close(loaded[k], v)
    assert all(torch.equal(v, model.sem_seg_head.state_dict()[k]) for k, v in heads_before.items())
    report = checkpointer.last_report
    assert report.unexpected == ["fc1000.weight"] and not report.incorrect_shapes


def test_shipped_resnet_configs():
    city = load_config("Cityscapes-PanopticSegmentation/efficientps_R_50.yaml")
    assert city.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert (city.MODEL.RESNETS.DEPTH, city.MODEL.RESNETS.NORM, city.INPUT.FORMAT) == (
        50,
        "FrozenBN",
        "BGR",
    )
    assert city.MODEL.PIXEL_STD == [1.0, 1.0, 1.0] and city.MODEL.RESNETS.STRIDE_IN_1X1
    quick = load_config("Synthetic-PanopticSegmentation/efficientps_R_50_quick.yaml")
    assert quick.MODEL.WEIGHTS == "" and quick.MODEL.BACKBONE.FREEZE_AT == 0
    assert quick.MODEL.RESNETS.NORM == "BN"
    for cfg in (city, quick):
        assert cfg.MODEL.TWO_WAY_FPN.BOTTOM_UP == "build_resnet_backbone"
        assert list(cfg.MODEL.TWO_WAY_FPN.IN_FEATURES) == RES
