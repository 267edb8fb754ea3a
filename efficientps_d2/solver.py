"""Optimizer with whole-model gradient clipping, as the official EfficientPS training used.

Detectron2's SOLVER.CLIP_GRADIENTS clips each parameter tensor on its own ("value", "norm"); the
paper clips the norm of all gradients together at 35. SOLVER.CLIP_GRADIENTS.CLIP_TYPE
"full_model" selects that, through the optimizer wrapper of Detectron2's ``solver/build.py`` with a
global clipper; every other setting is Detectron2's own ``build_optimizer``.
"""

import functools

import torch
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from detectron2.solver.build import (
    GradientClipType,
    _generate_optimizer_class_with_gradient_clipping,
)

# SOLVER.CLIP_GRADIENTS.CLIP_TYPE values: Detectron2's per-tensor ones and EfficientPS's.
CLIP_TYPES = tuple(t.value for t in GradientClipType) + ("full_model",)


def check_gradient_clipping(cfg):
    """Refuses a SOLVER.CLIP_GRADIENTS.CLIP_TYPE that is none of :data:`CLIP_TYPES` when clipping
    is on, naming the key; Detectron2 raised a bare "'x' is not a valid GradientClipType" when the
    optimizer was built, after the data check."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {list(CLIP_TYPES)}, got "
            f"{clip.CLIP_TYPE!r} (or set SOLVER.CLIP_GRADIENTS.ENABLED False)."
        )


def build_optimizer(cfg, model):
    check_gradient_clipping(cfg)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return build_detectron2_optimizer(cfg, model)
    unclipped = cfg.clone()
    unclipped.defrost()
    unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_detectron2_optimizer(unclipped, model)
    return with_full_model_gradient_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)


def sgd_with_full_model_gradient_clipping(
    params, *, lr, momentum=0.9, weight_decay=1e-4, clip_value=35.0, norm_type=2.0
):
    """SGD whose ``step()`` first clips the norm of all gradients together, for LazyConfig files
    (``optimizer.params`` is Detectron2's ``get_default_optimizer_params``, as in its configs)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return with_full_model_gradient_clipping(optimizer, clip_value, norm_type)


def with_full_model_gradient_clipping(optimizer, max_norm, norm_type=2.0):
    """Makes ``optimizer.step()`` first clip the total gradient norm of all its parameters.

    Under AMP, ``GradScaler.step`` unscales the gradients before calling ``step``, so the clip
    sees true gradient values.
    """
    base = type(optimizer)
    clipper = functools.partial(
        torch.nn.utils.clip_grad_norm_, max_norm=max_norm, norm_type=norm_type
    )
    clipped = _generate_optimizer_class_with_gradient_clipping(base, global_clipper=clipper)
    clipped.__name__ = clipped.__qualname__ = base.__name__ + "WithFullModelGradientClipping"
    optimizer.__class__ = clipped
    return optimizer


def warmup_multi_step_lr(*, max_iter, steps, warmup_iters, warmup_factor=0.001, gamma=0.1):
    """SOLVER.LR_SCHEDULER_NAME "WarmupMultiStepLR" as a LazyConfig ``lr_multiplier``.

    Linear warm-up from ``warmup_factor`` over ``warmup_iters``, then the rate times ``gamma`` at
    each of ``steps``; steps at or after ``max_iter`` are dropped, as the YAML path does. Taking
    iterations (not fractions of training) keeps it right when ``train.max_iter`` is overridden.
    """
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    steps = [s for s in steps if s < max_iter]
    scheduler = MultiStepParamScheduler(
        values=[gamma**k for k in range(len(steps) + 1)], milestones=steps, num_updates=max_iter
    )
    return WarmupParamScheduler(
        scheduler, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method="linear"
    )
