import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone
from torch.nn import functional as F
from torchvision.ops.misc import SqueezeExcitation

from efficientps_d2.modeling.backbone import EfficientNet
from efficientps_d2.modeling.backbone.two_way_fpn import TwoWayFPN
from tests.common import assert_p2_to_p5, tiny_config

# Channels at strides 4, 8, 16, 32 (the last is the 1x1 head conv), from the compound scaling.
EXPECTED_CHANNELS = {"b0": (24, 40, 112, 1280), "b5": (40, 64, 176, 2048)}


@pytest.mark.parametrize("variant", ["b0", "b5"])
def test_efficientnet_output_shapes_and_strides(variant):
    trunk = EfficientNet(variant).eval()
    with torch.no_grad():
        outputs = trunk(torch.zeros(1, 3, 96, 160))
    shapes = trunk.output_shape()
    for (name, spec), channels in zip(shapes.items(), EXPECTED_CHANNELS[variant]):
        stride = int(name[len("stride") :])
        assert spec == ShapeSpec(channels=channels, stride=stride)
        assert outputs[name].shape == (1, channels, 96 // stride, 160 // stride)


def test_b5_trunk_has_no_squeeze_excitation_and_matches_torchvision_size():
    trunk = EfficientNet("b5")
    # torchvision's efficientnet_b5 minus SE (5.19M) and classifier (2.05M).
    assert sum(p.numel() for p in trunk.parameters()) == 23_148_912
    assert not any(isinstance(m, SqueezeExcitation) for m in trunk.modules())
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.ReLU)) for m in trunk.modules())


def test_squeeze_excitation_can_be_kept():
    trunk = EfficientNet("b0", squeeze_excitation=True)
    assert any(isinstance(m, SqueezeExcitation) for m in trunk.modules())


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "GN", ""])
def test_norms_build_and_run(norm):
    trunk = EfficientNet("b0", norm=norm).eval()
    out = trunk(torch.zeros(1, 3, 64, 64))
    assert out["stride32"].shape == (1, 1280, 2, 2)


def test_two_way_fpn_from_config_with_odd_input():
    cfg = tiny_config()
    backbone = build_backbone(cfg).eval()
    assert backbone.size_divisibility == 32
    assert_p2_to_p5(backbone)  # same sizes as the trunk's padded stride-2 convs


class _GivenFeatures(Backbone):
    """A bottom-up stand-in that returns the given maps, at strides 4, 8, 16, 32."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features

    def output_shape(self):
        return {
            name: ShapeSpec(channels=f.shape[1], stride=4 * 2**i)
            for i, (name, f) in enumerate(self.features.items())
        }


def _max_pool_2x2(t):
    """Max over 2x2 blocks, the last partial row and column of blocks included."""
    t = F.pad(t, (0, t.shape[-1] % 2, 0, t.shape[-2] % 2), value=float("-inf"))
    return t.unflatten(-1, (-1, 2)).unflatten(-3, (-1, 2)).amax(dim=(-1, -3))


def test_two_way_fpn_sums_a_top_down_and_a_bottom_up_path():
    """The paper's aggregation (sec. 3.1), written out on the sizes a 36x52 image gives: the
    top-down path adds each coarser sum upsampled by pixel repetition (nearest), the bottom-up
    path each finer sum max-pooled 2x2; per level the two are summed and smoothed, and p6 takes
    every other pixel of p5."""
    torch.manual_seed(0)
    sizes = [(9, 13), (5, 7), (3, 4), (2, 2)]
    x = [torch.randn(1, 3 + i, h, w) for i, (h, w) in enumerate(sizes)]
    bottom_up = _GivenFeatures({f"c{i}": f for i, f in enumerate(x)})
    fpn = TwoWayFPN(
        bottom_up=bottom_up,
        in_features=["c0", "c1", "c2", "c3"],
        out_channels=4,
        norm="",
        top_block=True,
    ).eval()
    with torch.no_grad():
        out = fpn(None)
        top_down = [fpn.top_down_laterals[3](x[3])]
        for i in (2, 1, 0):
            coarser = top_down[0].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
            h, w = sizes[i]
            top_down.insert(0, fpn.top_down_laterals[i](x[i]) + coarser[..., :h, :w])
        bottom_up = [fpn.bottom_up_laterals[0](x[0])]
        for i in (1, 2, 3):
            bottom_up.append(fpn.bottom_up_laterals[i](x[i]) + _max_pool_2x2(bottom_up[-1]))
        expected = [fpn.output_convs[i](top_down[i] + bottom_up[i]) for i in range(4)]
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for i, name in enumerate(["p2", "p3", "p4", "p5"]):
        torch.testing.assert_close(out[name], expected[i], msg=name)
    torch.testing.assert_close(out["p6"], expected[3][..., ::2, ::2])


def test_fpn_top_block_adds_stride_64():
    cfg = tiny_config(["MODEL.TWO_WAY_FPN.TOP_BLOCK", True])
    backbone = build_backbone(cfg)
    assert backbone.output_shape()["p6"].stride == 64
    assert backbone.size_divisibility == 64


def test_trunk_alone_is_registered():
    cfg = tiny_config(["MODEL.BACKBONE.NAME", "build_efficientnet_backbone"])
    assert "build_efficientnet_backbone" in BACKBONE_REGISTRY
    assert set(build_backbone(cfg).output_shape()) == {"stride4", "stride8", "stride16", "stride32"}


def test_frozen_stages_do_not_train():
    trunk = EfficientNet("b0", freeze_at=2)
    assert not any(p.requires_grad for p in trunk.features[:2].parameters())
    assert all(p.requires_grad for p in trunk.features[2].parameters())


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("MODEL.EFFICIENTNET.VARIANT", "b9", "b0"),
        ("MODEL.EFFICIENTNET.NORM", "LayerNorm", "FrozenBN"),
        ("MODEL.EFFICIENTNET.OUT_FEATURES", ["stride3"], "stride4"),
        ("MODEL.TWO_WAY_FPN.IN_FEATURES", ["stride4", "res5"], "stride32"),
    ],
)
def test_bad_backbone_config_names_key_and_allowed_values(key, value, allowed):
    cfg = tiny_config([key, value])
    with pytest.raises(ValueError) as e:
        build_backbone(cfg)
    assert key in str(e.value) and str(value if isinstance(value, str) else value[-1]) in str(
        e.value
    )
    assert allowed in str(e.value)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = EfficientNet("b0", stochastic_depth_prob=0.0).train()
    checkpointed = EfficientNet("b0", stochastic_depth_prob=0.0, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        sum(o.sum() for o in model(x.clone().requires_grad_()).values()).backward()
        grads.append(model.features[3][0].block[0][0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
