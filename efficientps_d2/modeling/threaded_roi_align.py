"""Detectron2's ROIAlign on the CPU with its ROIs shared out between two threads, forward and
backward, in training as in inference.

torchvision's CPU ROIAlign, forward and backward, is a loop over the ROIs on one core, so on a
2-core machine one core idled through the ROI heads' pooling: a fifth of EfficientPS-B5's
inference at 512x1024, and a fifth of the main job's training step (batch 8, 512 box ROIs), most
of it in the backward. The ops release the GIL while they run, so two Python threads run them on
two cores. :func:`thread_roi_poolers` makes the ROI heads' poolers (Detectron2's ``ROIPooler``)
pool each level with a :class:`ThreadedROIAlign`.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch.autograd.function import once_differentiable

__all__ = ["ThreadedROIAlign", "roi_parts", "thread_roi_poolers"]

# Fewest ROIs per part for the pooling to be split (a thread costs ~0.1 ms, one ROI ~0.1-0.4 ms
# of ROIAlign).
MIN_ROIS_PER_THREAD = 16
# Most parts: measured on 2 cores. Each worker thread starts an OpenMP team of its own (torch's
# intra-op threads) for the backward's zeroed gradient map, so more parts on a machine with many
# threads would multiply them.
MAX_POOL_THREADS = 2
# The CPU kernels' float types; others (half precision) run torchvision's op as before.
_DTYPES = (torch.float32, torch.float64)


def roi_parts(count: int) -> List[int]:
    """Bounds of the consecutive parts that ``count`` ROIs are pooled in: ``[0, count]`` (one
    part) below ``2 * MIN_ROIS_PER_THREAD``, else up to ``MAX_POOL_THREADS`` parts of nearly equal
    size. They depend on the count alone, never on the machine's thread count: the gradient of a
    feature map is the sum of the parts' gradients, whose rounding depends on where the parts
    split, and a training run should give the same numbers on any machine (a machine with one
    thread runs the same parts one after the other)."""
    parts = max(1, min(count // MIN_ROIS_PER_THREAD, MAX_POOL_THREADS))
    return [count * k // parts for k in range(parts + 1)]


def _run_parts(fn: Callable, bounds: Sequence[int]) -> list:
    """``[fn(start, end) for each part]``: the first part on the calling thread and each other
    one on a thread of its own, or all on the calling thread where ``torch.get_num_threads()`` is
    1. ``fn`` runs torch ops only, outside autograd (workers run under ``no_grad`` and the
    caller's inference mode, both thread-local)."""
    spans = list(zip(bounds[:-1], bounds[1:]))
    if len(spans) == 1 or torch.get_num_threads() < 2:
        return [fn(*span) for span in spans]
    inference = torch.is_inference_mode_enabled()

    def work(span):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*span)

    with ThreadPoolExecutor(len(spans) - 1) as executor:
        others = [executor.submit(work, span) for span in spans[1:]]
        first = fn(*spans[0])
        return [first] + [future.result() for future in others]


def _roi_align_parts(input, rois, bounds, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision's ``roi_align`` of each part of ``rois``, in threads, rows in ``rois``' order:
    each ROI's row depends on its own box only, so they are the one call's, bit for bit."""
    # The CPU kernel makes its input contiguous: once here rather than once per thread (the
    # model's maps are channels-last).
    input = input.contiguous()
    height, width = output_size

    def pool(start, end):
        return torch.ops.torchvision.roi_align(
            input, rois[start:end], spatial_scale, height, width, sampling_ratio, aligned
        )

    return torch.cat(_run_parts(pool, bounds))


class _ThreadedROIAlignFunction(torch.autograd.Function):
    """torchvision's ROIAlign with its forward and backward run in parts (see :func:`roi_parts`).
    The backward of each part writes a gradient map of its own (torchvision's backward kernel
    zeroes a whole map per call); the maps are summed in the parts' order."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        bounds = roi_parts(len(rois))
        ctx.save_for_backward(rois)
        ctx.settings = (bounds, input.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return _roi_align_parts(
            input, rois, bounds, output_size, spatial_scale, sampling_ratio, aligned
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        bounds, shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.settings

        def backward_part(start, end):
            return torch.ops.torchvision._roi_align_backward(
                grad_output[start:end],
                rois[start:end],
                spatial_scale,
                *output_size,
                *shape,
                sampling_ratio,
                aligned,
            )

        grads = _run_parts(backward_part, bounds)
        grad_input = grads[0]
        for grad in grads[1:]:
            grad_input += grad
        return grad_input, None, None, None, None, None


class ThreadedROIAlign(ROIAlign):
    """Detectron2's :class:`~detectron2.layers.ROIAlign` (same settings: output size, spatial
    scale, sampling ratio, aligned) that runs torchvision's op, forward and backward, on the CPU
    in up to two parts on two threads (:func:`roi_parts`). The pooled rows are Detectron2's bit
    for bit; the feature map's gradient differs from torchvision's by float rounding only (its
    parts' sums are added in another order).

    It runs Detectron2's forward instead off the CPU, for other dtypes than float32/float64, for
    quantized inputs, for fewer than ``2 * MIN_ROIS_PER_THREAD`` ROIs, and under ``torch.jit``
    or ``torch.fx`` tracing (ONNX export traces; a trace records the calling thread only) and
    ``torch.compile``.
    """

    @classmethod
    def of(cls, roi_align: ROIAlign) -> "ThreadedROIAlign":
        """A :class:`ThreadedROIAlign` with ``roi_align``'s settings."""
        return cls(
            roi_align.output_size,
            roi_align.spatial_scale,
            roi_align.sampling_ratio,
            roi_align.aligned,
        )

    def forward(self, input, rois):
        if (
            isinstance(input, torch.fx.Proxy)
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or input.device.type != "cpu"
            or input.dtype not in _DTYPES
            or input.is_quantized
            or len(roi_parts(rois.shape[0])) < 3
        ):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5, f"rois of shape {tuple(rois.shape)}"
        rois = rois.to(dtype=input.dtype)
        # (height, width), as torchvision's roi_align reads an int output size.
        output_size = tuple(torch.nn.modules.utils._pair(self.output_size))
        settings = (output_size, float(self.spatial_scale), int(self.sampling_ratio), self.aligned)
        if torch.is_grad_enabled() and input.requires_grad:
            return _ThreadedROIAlignFunction.apply(input, rois, *settings)
        return _roi_align_parts(input, rois, roi_parts(len(rois)), *settings)


def thread_roi_poolers(roi_heads) -> int:
    """Makes each Detectron2 ``ROIPooler`` of ``roi_heads`` (``box_pooler``, ``mask_pooler``)
    pool its levels with :class:`ThreadedROIAlign` where they are Detectron2's ``ROIAlign``
    (pooler types "ROIAlign" and "ROIAlignV2"); other poolers and pooler types are left as they
    are. Returns how many level poolers it replaced. The modules hold no weights, so checkpoints
    and state dicts are unchanged."""
    replaced = 0
    for name in ("box_pooler", "mask_pooler"):
        pooler = getattr(roi_heads, name, None)
        if type(pooler) is not ROIPooler:
            continue
        for i, level in enumerate(pooler.level_poolers):
            if type(level) is ROIAlign:
                pooler.level_poolers[i] = ThreadedROIAlign.of(level)
                replaced += 1
    return replaced
