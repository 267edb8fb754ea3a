#!/usr/bin/env python
"""Operator calls per stage of EfficientPS-B5's fast inference, counted on the CPU.

On a GPU, inference past the dense network is bound by the host: each operator call costs tens
of microseconds of Python, dispatch and kernel launch (on an H200, 2026-11-28: 666 launches and
45 ms per 1024x2048 image, of which the dense network's GPU time is 12-15 ms). This counts those
calls without a GPU, for the same model and settings as ``benchmark.py`` (random weights, BN
statistics from one image, score thresholds 0: 100 detections), by stage: the ``EfficientPS.*``
markers of ``EfficientPS.inference`` (dense, proposals, detection, postprocess). Only top-level
calls count (an operator called by another operator is part of it), as a launch would.

By default the code takes the branches it takes on a GPU where it branches on the device: the
batched NMS as one NMS of boxes shifted apart per class (the CPU runs one NMS per class above
4,000 box coordinates), the panoptic fusion's "scatter" method and, in the fusion and the mask
pasting, the fewest chunks of box crops (the CPU takes compact chunks: less padding, more calls).
``--cpu-branches`` counts the CPU's own.

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
from detectron2.modeling import build_model
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (this folder's benchmark.py: the model it times)

from efficientps_d2.modeling import crop_chunks, fast_inference, fusion, mask_paste  # noqa: E402


@contextlib.contextmanager
def gpu_branches():
    """The NMS, the fusion and the mask pasting choose as they would on a GPU: classes shifted
    apart in one NMS, the "scatter" fusion and the fewest chunks of crops."""

    def fewest_chunks(sizes, compact=True):
        return crop_chunks.chunk_crops(sizes, compact=False)

    fuse = fusion.panoptic_fusion
    shifted_nms = functools.partial(fast_inference.batched_nms, device_type="cuda")

    def scatter_fusion(*args, **kwargs):
        return fuse(*args, **{**kwargs, "method": "scatter"})

    with mock.patch.object(mask_paste, "chunk_crops", fewest_chunks), mock.patch.object(
        fusion, "chunk_crops", fewest_chunks
    ), mock.patch.object(fusion, "panoptic_fusion", scatter_fusion), mock.patch.object(
        fast_inference, "batched_nms", shifted_nms
    ):
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
    """{stage: {operator: calls}} of one ``model(inputs)`` (run once before, unprofiled, so
    that lazily built state is not counted), top-level operator calls only."""
    with torch.no_grad():
        model(inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(inputs)
    calls = {stage: collections.Counter() for stage in benchmark._STAGES}
    for event in prof.events():
        parent = event.cpu_parent
        if not _is_operator(event) or (parent is not None and _is_operator(parent)):
            continue
        stage = _stage_of(event)
        if stage in calls:
            calls[stage][event.name] += 1
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x1024", help="input image HxW")
    parser.add_argument(
        "--cpu-branches", action="store_true", help="the CPU's own branches, not a GPU's"
    )
    parser.add_argument("--top", type=int, default=8, help="most called operators per stage")
    args = parser.parse_args(argv)
    height, width = benchmark._size(args.size)
    torch.manual_seed(0)
    model = build_model(benchmark.ours_config("cpu")).eval()
    benchmark.calibrate_norms(model, torch.randint(0, 256, (3, 256, 512), dtype=torch.uint8))
    model.fast_inference = True  # MODEL.EFFICIENTPS.FAST_INFERENCE, the default
    inputs = [{"image": benchmark._image(args.size)}]
    with contextlib.ExitStack() as stack:
        if not args.cpu_branches:
            stack.enter_context(gpu_branches())
        calls = count_calls(model, inputs)
        with torch.no_grad():
            detections = benchmark.detections(model(inputs)[0])
    branches = "the CPU's" if args.cpu_branches else "a GPU's"
    print(
        f"EfficientPS-B5 fast, {height}x{width}, {branches} branches, (detections, thing "
        f"segments) {detections}:"
    )
    for stage in benchmark._STAGES:
        common = ", ".join(f"{name} {n}" for name, n in calls[stage].most_common(args.top))
        print(f"{stage}: {sum(calls[stage].values())} calls ({common})")


if __name__ == "__main__":
    main()
