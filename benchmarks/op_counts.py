#!/usr/bin/env python
"""Operator calls per stage of EfficientPS-B5's fast inference, counted on the CPU.

On a GPU, inference past the dense network is bound by the host: each operator call costs tens
of microseconds of Python, dispatch and kernel launch (on an H200, 2026-11-28: 666 launches and
45 ms per 1024x2048 image, of which the dense network's GPU time is 12-15 ms). This counts those
calls without a GPU, for the same model and settings as ``benchmark.py`` (random weights, BN
statistics from one image, score thresholds 0: 100 detections), by stage: the ``EfficientPS.*``
markers of ``EfficientPS.inference`` (dense, proposals, detection, postprocess). Only top-level
calls count (an operator called by another operator is part of it), as a launch would.

By default the code after the dense network takes the branches it takes on a GPU where it
branches on the device: ROIAlign in one call per level (the CPU shares the ROIs out between two
threads), the batched NMS as one NMS of boxes shifted apart per class (the CPU runs one NMS per
class above 4,000 box coordinates), the panoptic fusion's "scatter" method and, in the fusion and
the mask pasting, the fewest chunks of box crops (the CPU takes compact chunks: less padding, more
calls). ``--cpu-branches`` counts the CPU's own. The dense network's calls are the CPU's (fused
conv + LeakyReLU kernels of oneDNN); on a GPU it is one CUDA graph replay when graphed.
``--graphed-roi-heads`` counts the ROI heads as MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS runs them
on a GPU: each of the box and mask stages one call (the graph's replay) after copying its input.

    .venv/bin/python benchmarks/op_counts.py --size 512x1024
"""

import argparse
import collections
import contextlib
import functools
import os
import sys
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (this folder's benchmark.py: the model it times)

from efficientps_d2.modeling import (  # noqa: E402
    crop_chunks,
    fast_inference,
    fusion,
    mask_paste,
    threaded_roi_align,
)


@contextlib.contextmanager
def gpu_branches():
    """The ROI pooling, the NMS, the fusion and the mask pasting choose as they would on a GPU:
    ROIAlign in one call per level (the CPU shares a level's ROIs out between two threads), classes
    shifted apart in one NMS, the "scatter" fusion (which takes the fewest chunks of crops itself)
    and the fewest chunks of crops in the mask pasting."""

    def fewest_chunks(sizes, compact=True):
        return crop_chunks.chunk_crops(sizes, compact=False)

    shifted_nms = functools.partial(fast_inference.batched_nms, device_type="cuda")

    with contextlib.ExitStack() as stack:
        for module, name, replacement in (
            (threaded_roi_align, "roi_parts", lambda count: [0, count]),
            (fast_inference, "batched_nms", shifted_nms),
            (fusion, "_auto_method", lambda device: "scatter"),
            (mask_paste, "chunk_crops", fewest_chunks),
        ):
            stack.enter_context(mock.patch.object(module, name, replacement))
        yield


class _OneReplay:
    """A stage of FixedShapeRoiHeads as a CUDA graph's replay counts: its inputs copied in, then
    one call (its operators, run on the CPU, are inside it, so not counted)."""

    def __init__(self, fn, *examples):
        self.fn = fn
        self.static_inputs = [x.clone() for x in examples]

    def __call__(self, *inputs):
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        with record_function("cuda::graph_replay"):
            return self.fn(*self.static_inputs)


@contextlib.contextmanager
def graphed_roi_heads():
    """InferenceNetwork.detect runs the ROI heads at fixed row counts (FixedShapeRoiHeads), each
    stage counted as one replay of its graph."""
    heads = {}

    def detect(network, roi_heads, features, proposals):
        if network not in heads:
            heads[network] = fast_inference.FixedShapeRoiHeads(
                network.box_head,
                network.mask_head,
                network.dense_network._rpn,
                capture=_OneReplay,
            )
        detections = heads[network].detect(roi_heads, features, proposals)
        assert detections is not None, "the benchmark's ROI heads are the kinds it graphs"
        return detections

    with mock.patch.object(fast_inference.InferenceNetwork, "detect", detect):
        yield


def _stage_of(event):
    while event is not None:
        if event.name.startswith(benchmark._STAGE_PREFIX):
            return event.name[len(benchmark._STAGE_PREFIX) :]
        event = event.cpu_parent
    return None


def _is_operator(event):
    return "::" in event.name and not event.name.startswith("profiler::")


def count_calls(model, inputs):
    """({stage: {operator: calls}}, outputs) of one ``model(inputs)`` (run once before,
    unprofiled, so that lazily built state is not counted), top-level operator calls only."""
    with torch.no_grad():
        model(inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outputs = model(inputs)
    calls = {stage: collections.Counter() for stage in benchmark._STAGES}
    for event in prof.events():
        parent = event.cpu_parent
        if not _is_operator(event) or (parent is not None and _is_operator(parent)):
            continue
        stage = _stage_of(event)
        if stage in calls:
            calls[stage][event.name] += 1
    return calls, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x1024", help="input image HxW")
    parser.add_argument(
        "--cpu-branches", action="store_true", help="the CPU's own branches, not a GPU's"
    )
    parser.add_argument(
        "--graphed-roi-heads",
        action="store_true",
        help="the ROI heads as CUDA_GRAPH_ROI_HEADS runs them, each stage one graph replay",
    )
    parser.add_argument("--top", type=int, default=8, help="most called operators per stage")
    args = parser.parse_args(argv)
    height, width = benchmark._size(args.size)
    # The benchmark's B5 (build_models also builds Panoptic FPN, unused here).
    models, _, _ = benchmark.build_models("cpu", [benchmark.OURS_FAST])
    model = models[benchmark.OURS_FAST][1]  # runs with MODEL.EFFICIENTPS.FAST_INFERENCE
    inputs = [{"image": benchmark._image(args.size)}]
    with contextlib.ExitStack() as stack:
        if not args.cpu_branches:
            stack.enter_context(gpu_branches())
        if args.graphed_roi_heads:
            stack.enter_context(graphed_roi_heads())
        calls, outputs = count_calls(model, inputs)
    detections = benchmark.detections(outputs[0])
    branches = "the CPU's" if args.cpu_branches else "a GPU's"
    graphed = ", ROI heads graphed" if args.graphed_roi_heads else ""
    print(
        f"EfficientPS-B5 fast, {height}x{width}, {branches} branches{graphed}, (detections, thing "
        f"segments) {detections}:"
    )
    for stage in benchmark._STAGES:
        common = ", ".join(f"{name} {n}" for name, n in calls[stage].most_common(args.top))
        print(f"{stage}: {sum(calls[stage].values())} calls ({common})")


if __name__ == "__main__":
    main()
