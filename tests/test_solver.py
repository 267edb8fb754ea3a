import torch

from efficientps_d2.solver import build_optimizer, with_full_model_gradient_clipping
from tests.common import tiny_config


def test_full_model_clipping_bounds_the_total_gradient_norm():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    optimizer = with_full_model_gradient_clipping(torch.optim.SGD([a, b], lr=1.0), max_norm=35.0)
    a.grad = torch.full((3,), 30.0)
    b.grad = torch.full((4,), 40.0)
    grads = torch.cat([a.grad, b.grad])
    optimizer.step()
    step = torch.cat([a.detach(), b.detach()])
    torch.testing.assert_close(step.norm(), torch.tensor(35.0), rtol=1e-4, atol=1e-4)
    # The direction is kept: one scale for all parameters, not a per-tensor clip.
    torch.testing.assert_close(-step, grads * 35.0 / grads.norm(), rtol=1e-4, atol=1e-4)


def test_small_gradients_are_untouched_and_other_clip_types_stay_detectron2s():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = with_full_model_gradient_clipping(torch.optim.SGD([p], lr=1.0), max_norm=35.0)
    p.grad = torch.tensor([3.0, 4.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-3.0, -4.0]))

    cfg = tiny_config(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value"])
    model = torch.nn.Linear(2, 2)
    assert "FullModel" not in type(build_optimizer(cfg, model)).__name__
    cfg = tiny_config()  # the base config's paper setting
    assert "FullModel" in type(build_optimizer(cfg, model)).__name__
