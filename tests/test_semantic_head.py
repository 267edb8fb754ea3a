import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head

from efficientps_d2.modeling.semantic_head import (
    DensePredictionCell,
    EfficientPSSemSegHead,
    hard_pixel_cross_entropy,
)
from tests.common import tiny_config

SHAPES = {f"p{i}": ShapeSpec(channels=8, stride=2**i) for i in (2, 3, 4, 5)}


def features(height, width):
    return {
        k: torch.randn(2, 8, -(-height // s.stride), -(-width // s.stride))
        for k, s in SHAPES.items()
    }


def test_head_predicts_all_classes_at_input_size():
    head = EfficientPSSemSegHead(SHAPES, num_classes=7, convs_dim=16, dpc_channels=16).eval()
    logits, losses = head(features(64, 96))
    assert logits.shape == (2, 7, 64, 96) and losses == {}


def test_training_returns_finite_loss_with_gradients():
    head = EfficientPSSemSegHead(SHAPES, num_classes=7, convs_dim=16, dpc_channels=16).train()
    targets = torch.randint(0, 7, (2, 64, 96))
    targets[:, :10] = 255
    _, losses = head(features(64, 96), targets)
    losses["loss_sem_seg"].backward()
    assert torch.isfinite(losses["loss_sem_seg"])
    assert all(p.grad is not None for p in head.parameters())


def test_dpc_branches_read_the_paper_inputs():
    # Branch 5 reads branch 4; branches 2-4 read branch 1. Changing branch 4's weights must change
    # the cell's output only through branches 4 and 5.
    cell = DensePredictionCell(8, 4, branch_channels=8, norm="").eval()
    x = torch.randn(1, 8, 9, 9)
    calls = []
    for i, branch in enumerate(cell.branches):
        branch.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0])))
    cell(x)
    inputs = dict(calls)
    assert inputs[0] is x
    assert all(torch.equal(inputs[k], cell.branches[0](x)) for k in (1, 2, 3))
    assert torch.equal(inputs[4], cell.branches[3](cell.branches[0](x)))


def test_dpc_branches_have_the_papers_dilations():
    # (height, width) rates of the five branches (Mohan & Valada, 2021, fig. 4). A checkpoint
    # loads whatever the rates are, so a changed rate would only show as worse results.
    cell = DensePredictionCell(8, 4, branch_channels=8, norm="")
    depthwise = [branch[0] for branch in cell.branches]
    assert [conv.dilation for conv in depthwise] == [(1, 6), (1, 1), (6, 21), (18, 15), (6, 3)]
    assert all(conv.padding == conv.dilation and conv.groups == 8 for conv in depthwise)


def test_logits_are_upsampled_bilinearly_to_the_input_size():
    head = EfficientPSSemSegHead(SHAPES, num_classes=1, convs_dim=16, dpc_channels=16).eval()
    up = head.upsample(torch.tensor([0.0, 4.0]).view(1, 1, 1, 2))
    assert up.shape == (1, 1, 4, 8)
    # Output pixel j's centre lies at (j + 0.5) / 4 - 0.5 on the stride-4 grid (clamped).
    expected = torch.tensor([4 * min(max((j + 0.5) / 4 - 0.5, 0), 1) for j in range(8)])
    torch.testing.assert_close(up[0, 0], expected.expand(4, 8))


def test_head_loss_is_the_weighted_hard_pixel_loss_of_the_unpadded_images():
    torch.manual_seed(0)
    head = EfficientPSSemSegHead(
        SHAPES, num_classes=3, convs_dim=16, dpc_channels=16, loss_weight=2.5
    ).train()
    predictions = torch.randn(2, 3, 4, 6)
    targets = torch.randint(0, 3, (2, 16, 24))
    targets[1, :, 16:] = 255  # image 1 is 16x16, padded to 16x24
    sizes = [(16, 24), (16, 16)]
    loss = head.losses(predictions, targets, sizes)["loss_sem_seg"]
    expected = hard_pixel_cross_entropy(
        head.upsample(predictions),
        targets,
        ignore_value=255,
        hard_pixel_fraction=0.25,
        image_sizes=sizes,
    )
    torch.testing.assert_close(loss, 2.5 * expected)
    with pytest.raises(ValueError, match=r"size \(16, 20\) do not match .* size \(16, 24\)"):
        head.losses(predictions, targets[..., :20], sizes)


def test_hard_pixel_loss_averages_the_hardest_fraction():
    logits = torch.zeros(1, 2, 1, 8)
    logits[0, 0] = torch.tensor([4.0, 3, 2, 1, 0, -1, -2, -3])  # target 0: loss rises along the row
    targets = torch.zeros(1, 1, 8, dtype=torch.long)
    per_pixel = torch.nn.functional.cross_entropy(logits, targets, reduction="none").flatten()
    loss = hard_pixel_cross_entropy(logits, targets, ignore_value=255, hard_pixel_fraction=0.25)
    torch.testing.assert_close(loss, per_pixel.sort().values[-2:].mean())
    full = hard_pixel_cross_entropy(logits, targets, ignore_value=255, hard_pixel_fraction=1.0)
    torch.testing.assert_close(full, per_pixel.mean())


def test_hard_pixel_loss_ignores_unlabelled_pixels():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    targets = torch.full((1, 4, 4), 255)
    for normalization in ("image", "labelled"):
        loss = hard_pixel_cross_entropy(
            logits, targets, ignore_value=255, hard_pixel_fraction=0.25, normalization=normalization
        )
        loss.backward()
        assert loss.item() == 0.0 and logits.grad is not None
    targets[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], targets[:, 0, 0])
    loss = hard_pixel_cross_entropy(
        logits, targets, ignore_value=255, hard_pixel_fraction=0.25, normalization="labelled"
    )
    torch.testing.assert_close(loss, expected)
    # The paper's w = 4/(H*W): the one labelled pixel's loss over a quarter of the 16 pixels.
    loss = hard_pixel_cross_entropy(logits, targets, ignore_value=255, hard_pixel_fraction=0.25)
    torch.testing.assert_close(loss, expected / 4)


def test_hard_pixel_loss_normalises_by_each_unpadded_image():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6)
    targets = torch.randint(0, 3, (2, 4, 6))
    targets[1, :, 4:] = 255  # image 1 is 4x4, padded to 4x6
    per_pixel = torch.nn.functional.cross_entropy(
        logits, targets, reduction="none", ignore_index=255
    )
    loss = hard_pixel_cross_entropy(
        logits, targets, ignore_value=255, hard_pixel_fraction=0.25, image_sizes=[(4, 6), (4, 4)]
    )
    image0 = per_pixel[0].flatten().sort().values[-6:].mean()  # ceil(0.25 * 24) = 6
    image1 = per_pixel[1, :, :4].flatten().sort().values[-4:].mean()  # ceil(0.25 * 16) = 4
    torch.testing.assert_close(loss, (image0 + image1) / 2)
    with pytest.raises(ValueError, match="HARD_PIXEL_NORMALIZATION.*'pixels'"):
        hard_pixel_cross_entropy(
            logits, targets, ignore_value=255, hard_pixel_fraction=0.25, normalization="pixels"
        )


def test_bad_hard_pixel_fraction_names_the_key():
    with pytest.raises(ValueError, match="HARD_PIXEL_FRACTION"):
        hard_pixel_cross_entropy(
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, 2, 2).long(),
            ignore_value=255,
            hard_pixel_fraction=0,
        )
    # When the head is built, not at the first training step (after the data check and the
    # weights): a percentage given for the fraction.
    with pytest.raises(ValueError, match=r"HARD_PIXEL_FRACTION must be in \(0, 1\], got 25"):
        EfficientPSSemSegHead(SHAPES, num_classes=7, convs_dim=16, hard_pixel_fraction=25)


def test_head_from_config_checks_features():
    cfg = tiny_config(["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4", "p7"]])
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.IN_FEATURES.*p7"):
        build_sem_seg_head(cfg, SHAPES)
    cfg = tiny_config(["MODEL.SEM_SEG_HEAD.NAME", "NoSuchHead"])
    with pytest.raises(KeyError, match="NoSuchHead"):
        build_sem_seg_head(cfg, SHAPES)


def test_official_recipe_defaults_and_the_quick_configs_own_values():
    from .common import load_config

    for name in (
        "Cityscapes-PanopticSegmentation/efficientps_b5.yaml",
        "Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml",
    ):
        cfg = load_config(name)
        assert cfg.MODEL.EFFICIENTNET.STOCHASTIC_DEPTH_PROB == 0.0, name
        assert cfg.MODEL.SEM_SEG_HEAD.HARD_PIXEL_NORMALIZATION == "image", name
    cityscapes = load_config("Cityscapes-PanopticSegmentation/efficientps_b5.yaml")
    assert cityscapes.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 256
    assert cityscapes.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    # The main job keeps its smaller, measured sampling (set in its own file).
    quick = load_config("Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml")
    assert (quick.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, quick.MODEL.RPN.POST_NMS_TOPK_TRAIN) == (
        64,
        300,
    )


def test_image_and_labelled_normalisation_agree_on_fully_labelled_padded_images():
    # The synthetic data labels every pixel, so switching its config to the paper's "image"
    # normalisation leaves its loss (and the README's measured run) unchanged.
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 8)
    targets = torch.randint(0, 4, (2, 6, 8))
    targets[1, 4:, :] = 255  # image 1 is 4x8, padded to 6x8
    kwargs = dict(ignore_value=255, hard_pixel_fraction=0.25)
    image = hard_pixel_cross_entropy(logits, targets, image_sizes=[(6, 8), (4, 8)], **kwargs)
    labelled = hard_pixel_cross_entropy(logits, targets, normalization="labelled", **kwargs)
    torch.testing.assert_close(image, labelled)
