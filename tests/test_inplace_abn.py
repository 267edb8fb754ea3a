"""In-place activated BatchNorm (MODEL.EFFICIENTPS.INPLACE_ABN): BatchNorm + LeakyReLU's results
and gradients, from half the saved activations; synchronised statistics across processes."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.layers import Conv2d, NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn import functional as F

from efficientps_d2.modeling import inplace_abn
from efficientps_d2.modeling.inplace_abn import InPlaceABN, convert_to_inplace_abn
from tests.common import DEVICES, PERMISSIVE, DeviceReads, tiny_config, training_input

SLOPE = 0.01


def _batch_norm(channels=5, momentum=0.1, dtype=torch.double, seed=0):
    """A BatchNorm2d with weights of both signs, as trained ones have."""
    g = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        signs = torch.tensor([-1.0, 1.0]).repeat(channels)[:channels]
        norm.weight.copy_((torch.rand(channels, generator=g) * 2 + 0.2) * signs)
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm


def _reference_and_abn(**kwargs):
    norm = _batch_norm(**kwargs)
    return norm, InPlaceABN.from_batch_norm(copy.deepcopy(norm), SLOPE)


def _run(module, x, grad, activation=False):
    x = x.clone().requires_grad_()
    y = module(x)
    if activation:
        y = F.leaky_relu(y, SLOPE)
    (y * grad).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_equals_batch_norm_then_leaky_relu(channels_last, momentum):
    """In float64 the two agree to rounding: outputs, every gradient, running statistics."""
    reference, abn = _reference_and_abn(momentum=momentum)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.double) * 3 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(x.shape, generator=g, dtype=torch.double)
        expected, expected_grad = _run(reference, x, grad, activation=True)
        got, got_grad = _run(abn, x, grad)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert got_grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(abn, name).grad, getattr(reference, name).grad, rtol=0, atol=1e-11
        )
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(abn, name), getattr(reference, name), rtol=0, atol=1e-12)


def test_eval_mode_is_batch_norm_with_running_statistics_then_leaky_relu():
    reference, abn = _reference_and_abn()
    with torch.no_grad():
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
    abn = InPlaceABN.from_batch_norm(copy.deepcopy(reference), SLOPE).eval()
    x = torch.randn(3, 5, 4, 4, dtype=torch.double)
    with torch.no_grad():
        expected = F.leaky_relu(reference.eval()(x), SLOPE)
        torch.testing.assert_close(abn(x), expected, rtol=0, atol=1e-12)


def _input_gradients_with_weights(channels, values):
    """BatchNorm + LeakyReLU and iABN with ``weight[channels] = values``, trained on one random
    batch: (reference, iabn, reference's input gradient, iABN's input gradient)."""
    reference, abn = _reference_and_abn()
    for norm in (reference, abn):
        with torch.no_grad():
            norm.weight[channels] = torch.tensor(values, dtype=torch.double)
    x = torch.randn(2, 5, 6, 7, dtype=torch.double)
    grad = torch.randn_like(x)
    _, expected_grad = _run(reference, x, grad, activation=True)
    _, got_grad = _run(abn, x, grad)
    return reference, abn, expected_grad, got_grad


def test_a_zero_weight_gives_finite_gradients():
    """A channel whose weight is 0 cannot be inverted: its input and bias still get their exact
    gradients (the output does not depend on the input there), its weight about none
    (documented)."""
    reference, abn, expected_grad, got_grad = _input_gradients_with_weights(slice(2, 3), [0.0])
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(abn.bias.grad, reference.bias.grad, rtol=0, atol=1e-11)
    assert abs(abn.weight.grad[2]) < 1e-8 and torch.isfinite(abn.weight.grad).all()


def test_a_small_weight_keeps_exact_gradients():
    """Only weights below 1e-5 in magnitude lose their own gradient: a small but ordinary one
    (1e-3, either sign) is inverted, and every gradient is BatchNorm + LeakyReLU's."""
    reference, abn, expected_grad, got_grad = _input_gradients_with_weights(
        slice(1, 3), [1e-3, -1e-3]
    )
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(abn.weight.grad, reference.weight.grad, rtol=0, atol=1e-9)


def test_an_empty_batch_keeps_the_statistics_as_batch_norm_does():
    """A mask head gets no ROIs when a training batch has no foreground: BatchNorm gives an empty
    output and keeps its statistics (torch's BatchNorm kernel, which iABN calls, cannot take it)."""
    reference, abn = _reference_and_abn()
    x = torch.zeros(0, 5, 14, 14, dtype=torch.double)
    expected, expected_grad = _run(reference, x, x, activation=True)
    got, got_grad = _run(abn, x, x)
    assert got.shape == expected.shape and got_grad.shape == expected_grad.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(abn, name), getattr(reference, name)), name


def test_one_value_per_channel_is_refused_as_batch_norm_does():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        InPlaceABN(3).train()(torch.ones(1, 3, 1, 1))


def test_a_second_derivative_is_refused_not_wrong():
    _, abn = _reference_and_abn()
    x = torch.randn(2, 5, 3, 3, dtype=torch.double, requires_grad=True)
    (grad,) = torch.autograd.grad(abn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        grad.sum().backward()


def test_freezing_after_the_conversion_is_refused():
    """FrozenBatchNorm would take an InPlaceABN for a BatchNorm and drop its LeakyReLU. The
    error names the key that freezes an EfficientNet before the conversion."""
    from efficientps_d2.modeling.backbone.efficientnet import EfficientNet

    backbone = EfficientNet("b0")
    convert_to_inplace_abn(backbone)
    with pytest.raises(ValueError, match=r"freeze first \(MODEL\.EFFICIENTNET\.FREEZE_AT does\)"):
        backbone.freeze(2)


def test_the_efficientnet_freeze_key_freezes_before_the_conversion():
    """MODEL.EFFICIENTNET.FREEZE_AT, the key the refusal above names, freezes the stem and first
    stage (FrozenBatchNorm, no gradients) and leaves the rest to become iABN; Detectron2's
    MODEL.BACKBONE.FREEZE_AT is ResNet's and leaves an EfficientNet trainable."""
    for key, frozen in (
        ("MODEL.EFFICIENTNET.FREEZE_AT", True),
        ("MODEL.BACKBONE.FREEZE_AT", False),
    ):
        model = build_model(tiny_config([key, 2, "MODEL.EFFICIENTPS.INPLACE_ABN", True]))
        features = model.backbone.bottom_up.features
        for stage in features[:2]:
            assert all(p.requires_grad != frozen for p in stage.parameters()), key
            assert any(isinstance(m, InPlaceABN) for m in stage.modules()) != frozen, key
        assert any(isinstance(m, InPlaceABN) for m in features[2].modules()), key


def test_bfloat16_under_autocast_is_close_to_float32():
    """Half-precision activations keep their dtype; the statistics and gradients are computed in
    float32, so they stay within bfloat16's rounding of the float32 ones."""
    reference, abn = _reference_and_abn(dtype=torch.float32)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = abn(conv(x))
    expected.square().sum().backward()
    expected_grad = abn.weight.grad.clone()
    abn.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = abn(conv(x))
    assert got.dtype == torch.bfloat16
    got.float().square().sum().backward()
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)
    torch.testing.assert_close(abn.weight.grad, expected_grad, rtol=0.05, atol=0.05)


def _saved_activations(module, x):
    """How many distinct activation-sized tensors ``module(x)``'s backward pass keeps."""
    storages = set()

    def pack(t):
        if t.numel() >= x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_())
    return len(storages)


def test_keeps_half_the_activations_of_batch_norm_and_leaky_relu():
    """Two conv -> norm -> LeakyReLU layers: BatchNorm keeps the conv input, each norm's input
    and each activation's output (5); iABN keeps the input and each layer's output (3)."""

    def layer(channels):
        conv = Conv2d(channels, channels, 3, padding=1, bias=False)
        conv.norm = nn.BatchNorm2d(channels)
        conv.activation = nn.LeakyReLU(SLOPE, inplace=True)
        return conv

    torch.manual_seed(0)
    chain = nn.Sequential(layer(8), layer(8))
    x = torch.randn(2, 8, 16, 16)
    assert _saved_activations(chain, x) == 5
    assert convert_to_inplace_abn(chain) == 2
    assert _saved_activations(chain, x) == 3


def test_conversion_covers_detectron2_convs_and_torchvision_sequences():
    from torchvision.ops import Conv2dNormActivation

    block = nn.Sequential(
        Conv2dNormActivation(3, 4, 3, activation_layer=nn.LeakyReLU),
        Conv2d(4, 4, 1, norm=nn.BatchNorm2d(4), activation=nn.LeakyReLU(0.1)),
        Conv2d(4, 4, 1, norm=nn.BatchNorm2d(4)),  # no activation: a projection, stays BN
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.LeakyReLU()),  # GN stays
    )
    keys = list(block.state_dict())
    assert convert_to_inplace_abn(block) == 2
    assert list(block.state_dict()) == keys
    assert isinstance(block[0][1], InPlaceABN) and isinstance(block[0][2], nn.Identity)
    assert block[1].norm.negative_slope == 0.1 and block[1].activation is None
    assert type(block[2].norm) is nn.BatchNorm2d and type(block[3][1]) is nn.GroupNorm
    with pytest.raises(ValueError, match="slope > 0"):
        InPlaceABN(4, negative_slope=0.0)


def test_conversion_keeps_mode_and_synchronisation_and_skips_what_it_cannot_invert():
    block = nn.Sequential(
        Conv2d(4, 4, 1, norm=NaiveSyncBatchNorm(4), activation=nn.LeakyReLU(0.1)),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.0)),  # a ReLU
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False), nn.LeakyReLU()),
    ).eval()
    assert convert_to_inplace_abn(block) == 1
    abn = block[0].norm
    assert isinstance(abn, InPlaceABN) and abn.synchronized and not abn.training
    assert type(block[1][1]) is nn.BatchNorm2d and type(block[2][1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) input, got \(2, 4, 5\)"):
        InPlaceABN(4).train()(torch.randn(2, 4, 5))


def _tiny(inplace_abn):
    torch.manual_seed(0)
    opts = [*PERMISSIVE, "MODEL.EFFICIENTPS.INPLACE_ABN", inplace_abn]
    return build_model(tiny_config(opts))


def test_model_with_inplace_abn_trains_and_infers_as_with_batch_norm():
    """MODEL.EFFICIENTPS.INPLACE_ABN changes no parameter, checkpoint key, loss or gradient
    beyond rounding, and inference (fused copy or the model's own modules) is BatchNorm's."""
    plain, abn = _tiny(False), _tiny(True)
    assert any(isinstance(m, InPlaceABN) for m in abn.modules())
    assert not any(isinstance(m, InPlaceABN) for m in plain.modules())
    assert plain.state_dict().keys() == abn.state_dict().keys()
    batch = [
        training_input(64, 96, [[8, 8, 40, 40], [50, 20, 90, 60]], [0, 1], seed=s) for s in (1, 2)
    ]
    losses, grads = [], []
    for model in (plain, abn):
        model.train()
        torch.manual_seed(5)  # the same proposal and ROI sampling
        with EventStorage():
            loss = model(batch)
        losses.append({k: v.item() for k, v in loss.items()})
        # The semantic loss alone: the detection losses' gradients hang on discrete choices
        # (matching, sampling, NMS) that float32 rounding can flip in this untrained model.
        loss["loss_sem_seg"].backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert losses[1].keys() == losses[0].keys()
    for name, value in losses[0].items():
        assert losses[1][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # Each layer's gradients agree to rounding (float64, above). Through this untrained network
    # float32 rounding grows to a few percent: the same BatchNorm model, channels-last against
    # NCHW, differs by 3-3.5%. A wrong gradient formula differs by far more.
    assert (grads[1] - grads[0]).norm() <= 0.1 * grads[0].norm()
    for name, tensor in plain.state_dict().items():  # running statistics updated alike
        difference = (abn.state_dict()[name] - tensor).abs().max()
        assert difference <= 1e-4 * tensor.abs().max() + 1e-6, name

    images = [{"image": training_input(80, 96, [], [], seed=7)["image"]}]
    plain.eval()
    abn.eval()
    with torch.no_grad():
        expected = plain(images)[0]
        for fast in (True, False):
            abn.fast_inference = fast
            got = abn(images)[0]
            torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], rtol=1e-4, atol=1e-4)
            assert torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0])


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def test_a_batch_without_things_trains_with_inplace_abn():
    """No foreground ROIs: the mask head's norms get an empty batch, as with BatchNorm."""
    model = _tiny(True).train()
    with EventStorage():
        losses = model([training_input(64, 96, [], [], seed=1)])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _synchronised_worker(rank, init_file, x, grad, splits, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _, abn = _reference_and_abn()
        abn.synchronized = True
        results = []
        for split in splits:  # each the first process's share of the batch
            part = slice(0, split) if rank == 0 else slice(split, len(x))
            y, x_grad = _run(abn, x[part], grad[part])
            results.append({"y": y, "x_grad": x_grad, "weight_grad": abn.weight.grad.clone()})
            abn.weight.grad = abn.bias.grad = None
        statistics = {name: getattr(abn, name).clone() for name in STATISTICS}
        _run(abn, x[:0], grad[:0])  # no input on any process: the running statistics stay
        results.append({name: getattr(abn, name) for name in ("running_mean", "running_var")})
        torch.save((results, statistics), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_synchronized_statistics_span_the_processes(tmp_path):
    """Two gloo processes sharing a batch (evenly, unevenly, or one with nothing, as a mask head
    without foreground ROIs) compute what one process computes on the whole batch: outputs,
    input gradients and running statistics, as SyncBatchNorm does; the weight's gradient is
    each process's share (DDP averages it, as SyncBatchNorm's)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=torch.double) * 2 + 3  # mean well off zero
    x[2:] += 1.5  # the processes' shares differ
    grad = torch.randn(x.shape, generator=g, dtype=torch.double)
    splits = (2, 3, 4)
    _, whole = _reference_and_abn()
    expected = []
    for _ in splits:
        expected.append(_run(whole, x, grad) + (whole.weight.grad.clone(),))
        whole.weight.grad = whole.bias.grad = None
    mp.start_processes(
        _synchronised_worker,
        args=(str(tmp_path / "rendezvous"), x, grad, splits, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    (first, statistics), (second, _) = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    for split, a, b, (y, x_grad, weight_grad) in zip(splits, first, second, expected):
        torch.testing.assert_close(torch.cat([a["y"], b["y"]]), y, rtol=0, atol=1e-12)
        got_grad = torch.cat([a["x_grad"], b["x_grad"]])
        torch.testing.assert_close(got_grad, x_grad, rtol=0, atol=1e-12, msg=str(split))
        shares = a["weight_grad"] + b["weight_grad"]
        torch.testing.assert_close(shares, weight_grad, rtol=0, atol=1e-10, msg=str(split))
    for name in STATISTICS:
        torch.testing.assert_close(statistics[name], getattr(whole, name), rtol=0, atol=1e-12)
    for name in ("running_mean", "running_var"):
        assert torch.equal(first[-1][name], statistics[name]), name


def test_synchronised_statistics_neither_read_nor_upload(monkeypatch):
    """Every synchronised layer of every training step combines its statistics: a value read
    from the device, or a tensor made from host data (a copy that waits for the device), would
    make the host wait for the GPU each time (137 layers in B5). One process stands in here."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather", lambda out, t, group=None: out[0].copy_(t))
    y = torch.randn(2, 3, 4, 5, dtype=torch.double)
    with DeviceReads() as reads:
        mean, var, count = inplace_abn._statistics_across(y, group=None)
    assert not reads.counts
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, y.var(dim=(0, 2, 3), unbiased=False))
    assert count.item() == 2 * 4 * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_training_equals_batch_norm_then_leaky_relu(device, dtype):
    """Channels-last, in float32 and under bfloat16 autocast (as AMP training runs it): outputs
    and gradients as BatchNorm + LeakyReLU's, within the dtype's rounding. bfloat16's rounding
    scales with each tensor's size: the conv's weight gradient sums 512 products per element and
    reaches about 140 here, where one bfloat16 step is 0.5 (an absolute 0.03 failed on an H200)."""
    reference, abn = _reference_and_abn(dtype=torch.float32)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    results = []
    for norm, activation in ((reference.to(device), True), (abn.to(device), False)):
        conv.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            y = norm(conv(x))
            y = F.leaky_relu(y, SLOPE) if activation else y
        assert y.dtype == dtype
        y.float().square().sum().backward()
        results.append((y.float(), conv.weight.grad.clone(), norm.weight.grad.clone()))
    for got, expected in zip(results[1], results[0]):
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        else:
            scale = expected.abs().max().item()
            torch.testing.assert_close(got, expected, rtol=0, atol=3e-2 * scale)


def test_torch_compile_traces_it_whole_with_the_same_results():
    """MODEL.EFFICIENTPS.COMPILE_TRAINING compiles the backbone and semantic head: the iABN
    Function must trace as one graph (no break) and give eager's outputs, gradients and running
    statistics (aot_eager: the autograd graph as compiled, without Inductor's minutes on a CPU)."""
    torch._dynamo.reset()
    reference, abn = _reference_and_abn(dtype=torch.float32)
    eager = InPlaceABN.from_batch_norm(copy.deepcopy(reference), SLOPE)
    compiled = torch.compile(abn, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(4))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        expected, expected_grad = _run(eager, x, grad)
        got, got_grad = _run(compiled, x, grad)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_grad, expected_grad)
    torch.testing.assert_close(abn.weight.grad, eager.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(abn, name), getattr(eager, name))
    torch._dynamo.reset()
