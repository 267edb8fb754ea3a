"""Detectron2's ROIAlign on the CPU with its ROIs shared out between two threads, forward and
backward, in training as in inference.

torchvision's CPU ROIAlign, forward and backward, is a loop over the ROIs on one core, so on a
2-core machine one core idled through the ROI heads' pooling: a fifth of EfficientPS-B5's
inference at 512x1024, and a fifth of the main job's training step (batch 8, 512 box ROIs), most
of it in the backward. The ops release the GIL while they run, so two Python threads run them on
two cores. :func:`thread_roi_poolers` makes the ROI heads' poolers (Detectron2's ``ROIPooler``)
pool each level with a :class:`ThreadedROIAlign`.

Both directions give torchvision's results bit for bit, so a training run is the one it would be
without threads, on any machine: each pooled row depends on its own box only, and the backward
splits between images (each part's gradient covers its own images, whose sums run over their
ROIs in the one call's order).
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch.autograd.function import once_differentiable

__all__ = ["ThreadedROIAlign", "image_parts", "roi_parts", "thread_roi_poolers"]

# Fewest ROIs per part for the pooling to be split (a thread costs ~0.1 ms, one ROI ~0.1-0.4 ms
# of ROIAlign).
MIN_ROIS_PER_THREAD = 16
# Most parts: measured on 2 cores. Each worker thread starts an OpenMP team of its own (torch's
# intra-op threads) for the ops' zeroed outputs, so more parts on a machine with many threads
# would multiply them.
MAX_POOL_THREADS = 2
# The CPU kernels' float types; others (half precision) run torchvision's op as before.
_DTYPES = (torch.float32, torch.float64)


def roi_parts(count: int) -> List[int]:
    """Bounds of the consecutive parts that ``count`` ROIs are pooled in: ``[0, count]`` (one
    part) below ``2 * MIN_ROIS_PER_THREAD``, else up to ``MAX_POOL_THREADS`` parts of nearly equal
    size. They depend on the count alone, not on the machine's thread count (a machine with one
    thread runs the same parts one after the other)."""
    parts = max(1, min(count // MIN_ROIS_PER_THREAD, MAX_POOL_THREADS))
    return [count * k // parts for k in range(parts + 1)]


def image_parts(rois: torch.Tensor, bounds: Sequence[int]) -> List[int]:
    """``bounds`` (:func:`roi_parts`) with each inner bound moved to the nearest first ROI of an
    image, for the backward: parts whose ROIs belong to different images write disjoint parts of
    the gradient. One part where that cannot be (all ROIs of one image, or ``rois`` not sorted by
    image, which Detectron2's ``ROIPooler`` always sorts them by)."""
    if len(bounds) < 3:
        return [0, len(rois)]
    images = rois[:, 0]
    starts = torch.nonzero(images[1:] != images[:-1]).flatten() + 1
    if len(starts) == 0 or not bool((images[1:] >= images[:-1]).all()):
        return [0, len(rois)]
    inner = {int(starts[(starts - bound).abs().argmin()]) for bound in bounds[1:-1]}
    return [0, *sorted(inner), len(rois)]


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
    """torchvision's ROIAlign with its forward run in the parts of :func:`roi_parts` and its
    backward in those of :func:`image_parts`, each on its own thread. Each backward part pools
    into the gradient of its own images only (its ROIs' image indices shifted to its first
    image), and the parts' gradients are concatenated: every pixel's sum runs over the same ROIs
    in the same order as in torchvision's one call."""

    @staticmethod
    def forward(ctx, input, rois, bounds, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.settings = (input.shape, bounds, output_size, spatial_scale, sampling_ratio, aligned)
        return _roi_align_parts(
            input, rois, bounds, output_size, spatial_scale, sampling_ratio, aligned
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        (images, *map_shape), bounds, output_size, spatial_scale, sampling_ratio, aligned = (
            ctx.settings
        )
        bounds = image_parts(rois, bounds)

        def backward_part(start, end):
            # Images [first, last): from image 0 for the first part, to the last image for the
            # last one, so that images without ROIs get their zeros too.
            first = int(rois[start, 0]) if start > 0 else 0
            last = int(rois[end, 0]) if end < len(rois) else images
            part = rois[start:end]
            if first > 0:
                part = part.clone()
                part[:, 0] -= first
            return torch.ops.torchvision._roi_align_backward(
                grad_output[start:end],
                part,
                spatial_scale,
                *output_size,
                last - first,
                *map_shape,
                sampling_ratio,
                aligned,
            )

        grads = _run_parts(backward_part, bounds)
        grad_input = grads[0] if len(grads) == 1 else torch.cat(grads)
        return grad_input, None, None, None, None, None, None


class ThreadedROIAlign(ROIAlign):
    """Detectron2's :class:`~detectron2.layers.ROIAlign` (same settings: output size, spatial
    scale, sampling ratio, aligned) that runs torchvision's op, forward and backward, on the CPU
    in up to two parts on two threads: forward in parts of the ROIs (:func:`roi_parts`),
    backward in parts between images (:func:`image_parts`; one part for a single image). Pooled
    rows and the feature map's gradient are torchvision's bit for bit.

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
        ):
            return super().forward(input, rois)
        bounds = roi_parts(rois.shape[0])
        if len(bounds) < 3:  # too few ROIs to split
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5, f"rois of shape {tuple(rois.shape)}"
        rois = rois.to(dtype=input.dtype)
        # (height, width), as torchvision's roi_align reads an int output size.
        output_size = tuple(torch.nn.modules.utils._pair(self.output_size))
        settings = (output_size, float(self.spatial_scale), int(self.sampling_ratio), self.aligned)
        # Without grad (inference) autograd records nothing, and this is the forward alone.
        return _ThreadedROIAlignFunction.apply(input, rois, bounds, *settings)


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
