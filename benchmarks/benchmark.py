#!/usr/bin/env python
"""EfficientPS-B5 against Detectron2's Panoptic FPN R50: size, FLOPs, latency and memory.

One command, one process, both models::

    .venv/bin/python benchmarks/benchmark.py --output benchmarks/results

writes ``results.json`` and ``results.md`` (a Markdown table) to the output folder. See the
README's Performance section for what is measured and how to read it. On a CUDA machine it adds AMP
latency, training iterations per second at a 1024x2048 crop and peak GPU memory.
"""

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings

import detectron2
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from torch.nn.modules.batchnorm import _BatchNorm

from efficientps_d2 import setup_cfg
from efficientps_d2.atomic_io import atomic_write, check_writable_folder
from efficientps_d2.modeling.fast_inference import fuse_for_inference
from efficientps_d2.modeling.inplace_abn import convert_to_inplace_abn

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
OURS_CONFIG = "Cityscapes-PanopticSegmentation/efficientps_b5.yaml"
OURS_SMALL_CONFIG = "Cityscapes-PanopticSegmentation/efficientps_b0_512x1024.yaml"
OURS_R50_CONFIG = "Cityscapes-PanopticSegmentation/efficientps_R_50.yaml"
THEIRS_CONFIG = "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml"
# Where detectron2.model_zoo.get_config_file finds it, without importing detectron2.model_zoo:
# that imports pkg_resources, which setuptools no longer ships from version 82 on.
THEIRS_CONFIG_FILE = os.path.join(
    os.path.dirname(detectron2.__file__), "model_zoo", "configs", THEIRS_CONFIG
)
# Cityscapes: 19 classes, of which 8 things (train ids 11-18).
NUM_CLASSES, NUM_THINGS = 19, 8
OURS, OURS_FAST, THEIRS, THEIRS_FUSED = (
    "EfficientPS-B5",
    "EfficientPS-B5 fast",
    "PanopticFPN-R50",
    "PanopticFPN-R50 fused",
)
# EfficientPS on Detectron2's ResNet-50 (the backbone Panoptic FPN R50 uses), fast inference path.
OURS_R50 = "EfficientPS-R50 fast"
# EfficientPS-B5 training with in-place activated BN (MODEL.EFFICIENTPS.INPLACE_ABN), GPU rows.
OURS_IABN = "EfficientPS-B5 iABN"
# EfficientPS-B5 training through torch.compile (MODEL.EFFICIENTPS.COMPILE_TRAINING), GPU rows.
OURS_COMPILED_TRAINING = "EfficientPS-B5 compiled"
ALL_MODELS = (OURS_FAST, OURS, OURS_R50, THEIRS, THEIRS_FUSED)
# What --models accepts.
MODEL_KEYS = {
    "ours-fast": OURS_FAST,
    "ours": OURS,
    "ours-r50": OURS_R50,
    "theirs": THEIRS,
    "theirs-fused": THEIRS_FUSED,
}
# The plain model exported to ONNX and run by onnxruntime on the CPU (efficientps_d2.export);
# not in "all": it needs onnxruntime and a trace of the B5 graph first.
OURS_ONNX = "EfficientPS-B5 onnxruntime-CPU"
MODEL_KEYS["ours-onnx"] = OURS_ONNX


def model_names(keys):
    """The rows that --models asks for, in its order, once each: "all" stands for the five
    models of ALL_MODELS, and keys beside it (ours-onnx) are kept."""
    names = []
    for key in keys:
        for name in ALL_MODELS if key == "all" else (MODEL_KEYS[key],):
            if name not in names:
                names.append(name)
    return names


# --paths: EfficientPS-B5 fast run other ways (changes to its InferenceOptions, see
# efficientps_d2.modeling.fast_inference), each a row of its own.
PATHS = {
    "bf16": {"dtype": "bfloat16"},
    "graph": {"cuda_graph": True},
    "graph-bf16": {"cuda_graph": True, "dtype": "bfloat16"},
    "graph-heads-bf16": {"cuda_graph": True, "cuda_graph_roi_heads": True, "dtype": "bfloat16"},
    "compiled-bf16": {"compile": True, "dtype": "bfloat16"},
}
DEFAULT_CUDA_PATHS = list(PATHS)

logger = logging.getLogger("efficientps_d2.benchmark")


# -------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------


def ours_config(device, name=OURS_CONFIG):
    """The shipped config with every synchronised BN replaced by BN (one process) and test
    thresholds 0."""
    cfg = setup_cfg(os.path.join(CONFIGS, name), freeze=False)
    cfg.MODEL.DEVICE = device  # as asked, even where setup_cfg would fall back to the CPU
    # Plain: each row picks its path, and FLOPs are counted on the model's own modules.
    cfg.MODEL.EFFICIENTPS.FAST_INFERENCE = False
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.PANOPTIC_FUSION.CONFIDENCE_THRESH = 0.0
    for node in (
        cfg.MODEL.EFFICIENTNET,
        cfg.MODEL.TWO_WAY_FPN,
        cfg.MODEL.SEM_SEG_HEAD,
        cfg.MODEL.ROI_MASK_HEAD,
    ):
        node.NORM = "BN" if "SyncBN" in node.NORM else node.NORM  # SyncBN, naiveSyncBN_N
    if cfg.MODEL.RPN.HEAD_NORM == "SyncBN":
        cfg.MODEL.RPN.HEAD_NORM = "BN"
    return cfg


def theirs_config(device):
    """Detectron2's Panoptic FPN R50 3x, random weights, Cityscapes class counts, thresholds 0."""
    cfg = get_cfg()
    cfg.merge_from_file(THEIRS_CONFIG_FILE)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_THINGS
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES - NUM_THINGS + 1  # stuff + "things"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = 0.0
    cfg.MODEL.DEVICE = device
    return cfg


@torch.no_grad()
def calibrate_norms(model, image):
    """Sets every BN / FrozenBN's statistics from one forward pass (data-dependent init).

    With random weights and default statistics (mean 0, var 1), ResNet's activations grow by
    orders of magnitude with depth and the detector's boxes degenerate; after this, every norm
    sees unit-scale features, so both detectors produce boxes that the timing is fair about.
    """

    def set_statistics(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [
        m.register_forward_pre_hook(set_statistics)
        for m in model.modules()
        if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))
    ]
    model.eval()
    # The hooks sit on the model's own norms, which a fused inference copy would not run.
    fast = getattr(model, "fast_inference", None)
    if fast is not None:
        model.fast_inference = False
    try:
        model([{"image": image}])
    finally:
        for hook in hooks:
            hook.remove()
        if fast is not None:
            model.fast_inference = fast


def build_models(device, names=ALL_MODELS):
    """{name: (model, callable)} for the requested names, plus the plain models as "ours" and
    "theirs" (which FLOPs are counted on); ours plain and fast share one model."""
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (3, 256, 512), dtype=torch.uint8)
    ours = build_model(ours_config(device)).eval()
    calibrate_norms(ours, calibration)
    theirs = build_model(theirs_config(device)).eval()
    calibrate_norms(theirs, calibration)
    models = {
        OURS: (ours, _with_fast_inference(ours, False)),
        OURS_FAST: (ours, _with_fast_inference(ours, True)),
        THEIRS: (theirs, theirs),
    }
    if THEIRS_FUSED in names:
        fused = fuse_for_inference(copy.deepcopy(theirs))
        models[THEIRS_FUSED] = (fused, fused)
    if OURS_R50 in names:  # random weights like the others (no ImageNet download)
        r50 = build_model(ours_config(device, OURS_R50_CONFIG)).eval()
        calibrate_norms(r50, calibration)
        models[OURS_R50] = (r50, _fast_only_while_running(r50))
    for path, changes in PATHS.items():
        name = path_name(path)
        if name in names:
            # A model of its own (same weights), so that each keeps its own cached copy.
            variant = copy.deepcopy(ours)  # without its cached copy
            variant.inference_options = dataclasses.replace(
                ours.inference_options, fast_inference=True, **changes
            )
            models[name] = (variant, variant)
    if OURS_ONNX in names:
        models[OURS_ONNX] = (ours, onnxruntime_runner(ours, ours_config(device)))
    return {name: models[name] for name in names}, ours, theirs


def path_name(path):
    """The row name of one of ``PATHS``."""
    return f"{OURS_FAST} {path}"


def onnxruntime_runner(model, cfg):
    """``model`` exported to ONNX (efficientps_d2.export, traced on the CPU) and loaded into an
    onnxruntime CPU session; called like the model. The export takes a minute or more for B5."""
    from efficientps_d2.export import export_model, load

    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    if model.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, cfg, os.path.join(tmp, "onnx"), "onnx")
        exported = load(os.path.join(tmp, "onnx"))  # the session holds the graph in memory
    logger.info("ONNX export and session: %.1f s", time.perf_counter() - start)
    return exported


def _with_fast_inference(model, enabled):
    def run(inputs):
        model.fast_inference = enabled
        return model(inputs)

    return run


def _fast_only_while_running(model):
    """Runs ``model`` on its fast path; it stays plain otherwise (FLOPs are counted on it)."""

    def run(inputs):
        model.fast_inference = True
        try:
            return model(inputs)
        finally:
            model.fast_inference = False

    return run


# -------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _release_free_memory():
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_increase_mib(fn, device):
    """Peak memory added while ``fn()`` runs, in MiB (None where it cannot be measured).

    GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before. CPU: the process'
    peak resident set (VmHWM, reset through /proc/self/clear_refs) above its resident set before,
    after returning freed heap memory to the OS (malloc_trim) so that it is not reused unseen.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _release_free_memory()
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def kept_memory_mib(fn):
    """GPU memory that ``fn()`` leaves reserved for good, in MiB: a CUDA graph's private pool (or
    a compiled network's), which every replay reuses, so that ``max_memory_allocated`` around a
    replay does not see it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return (torch.cuda.memory_reserved() - before) / 2**20


def count_flops(model, image):
    """fvcore FLOPs of one inference (fvcore counts one multiply-add as one flop)."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, [{"image": image}])
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total()


def detections(output):
    """(detections, thing segments) of one panoptic output."""
    segments = output["panoptic_seg"][1]
    return len(output["instances"]), sum(1 for s in segments if s.get("isthing", False))


def time_inference(runners, image, *, device, warmup, repeats, amp_dtype=None, memory=False):
    """Latency of each runner, batch 1, eval mode; the runs of all models are interleaved.

    Returns:
        ({name: [seconds of each timed run]}, {name: (detections, thing segments)},
        {name: peak memory increase of the last warm-up run in MiB} if ``memory``, else {},
        {name: memory the first two runs left reserved for good in MiB} if ``memory`` on CUDA
            (a size's CUDA graph is captured at its second run),
        {name: error} for the runners that raised: each is dropped from the rest of the runs, so
        that one path failing (a CUDA graph capture, a compilation) loses only its own row).
        The peak memory is that of the last warm-up run, after the others: with ``warmup`` >= 2,
        after one-off costs (cuDNN autotuning, compilation, cached copies), and with 3 or more
        after a CUDA graph's capture too (at a size's second run).
    """
    if memory and warmup == 0:
        raise ValueError("Measuring memory needs at least one warm-up run (--warmup).")
    inputs = [{"image": image}]
    times = {name: [] for name in runners}
    counts, peaks, kept, failed = {}, {}, {}, {}

    def run_once(run):
        with torch.no_grad(), autocast():
            return run(inputs)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    def warmup_run(i, name, run):
        result = {}

        def once():
            result["out"] = run_once(run)

        def last_warmup():
            # The last warm-up run gives the peak memory (statistics reset just before it).
            peaks[name] = peak_memory_increase_mib(once, device)

        fn = last_warmup if i == warmup - 1 and memory else once
        if i < 2 and memory and device.startswith("cuda"):
            kept[name] = kept.get(name, 0.0) + kept_memory_mib(fn)
        else:
            fn()
        return result["out"]

    for i in range(warmup + repeats):
        for name, run in runners.items():
            if name in failed:
                continue
            try:
                if i < warmup:
                    outputs = warmup_run(i, name, run)
                else:
                    _sync(device)
                    start = time.perf_counter()
                    outputs = run_once(run)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
                counts[name] = detections(outputs[0])
                del outputs
            except Exception as e:  # recorded in the report; the other rows go on
                logger.exception("%s failed", name)
                failed[name] = f"{type(e).__name__}: {e}"
    return times, counts, peaks, kept, failed


def _ours_network(model, name):
    """The InferenceNetwork that the row ``name`` runs (OURS and OURS_FAST share one model)."""
    if name in (OURS, OURS_FAST):
        model.fast_inference = name == OURS_FAST
    return model._inference_network()


def time_dense(models, image, *, device, warmup, repeats):
    """Seconds of each timed run of the dense network alone (backbone, FPN, semantic head, RPN
    head, proposal decoding and each level's pre-NMS top-k: ``InferenceNetwork.dense``) of each
    EfficientPS row, interleaved, batch 1; a row that raises is logged and left out."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        x = next(iter(models.values())).preprocess_image([{"image": image}]).tensor
        for i in range(warmup + repeats):
            for name, model in models.items():
                if name not in times:
                    continue
                try:
                    network = _ours_network(model, name)
                    _sync(device)
                    start = time.perf_counter()
                    network.dense(x)
                    _sync(device)
                except Exception:  # the other rows go on
                    logger.exception("dense network of %s failed", name)
                    del times[name]
                    continue
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


# CUDA runtime calls seen by torch.profiler on the host: kernel launches, and the calls that
# make the host wait for the GPU (a blocking copy in either direction, an explicit sync).
# CUPTI may name them with a version suffix (cudaLaunchKernelExC_v11060), which is dropped.
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
# EfficientPS.inference names its stages for the profiler: "EfficientPS.dense", ...
_STAGE_PREFIX = "EfficientPS."
# In order; "dense" includes the preprocessing (normalising and padding the batch).
_STAGES = ("dense", "proposals", "detection", "postprocess")
# How many operators the GPU profiles list by their kernels' time.
GPU_OPS_LISTED = 12


def gpu_profile(run, runs=3):
    """What one ``run()`` costs the GPU, from torch.profiler (CPU and CUDA activities), averaged
    over ``runs``: {"kernel_s": GPU time of its kernels and copies (divided by the wall time, the
    fraction of the run in which the GPU is busy), "launches": kernel launches, "syncs": times
    the host waits for the GPU, "stages" and "gpu_stages": {stage: seconds} for EfficientPS, on
    the host and on the GPU (first to last kernel), "gpu_ops": [[operator, GPU seconds], ...] the
    operators whose own kernels took the most GPU time, most first}. Launches and waits are what
    bind a run to the CPU; the stages say where, and the operators what the GPU spends on. A
    stage that waits for the GPU takes in, on the host, the GPU time of the stages before it: the
    two read together."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run()
        torch.cuda.synchronize()
    return summarize_profile(prof.key_averages(), runs, trailing_syncs=1)


def summarize_profile(events, runs, trailing_syncs=0):
    """:func:`gpu_profile`'s numbers from ``key_averages()`` events of ``runs`` runs, less the
    ``trailing_syncs`` waits the profiling itself added."""
    from torch.autograd import DeviceType

    kernel_us, launches, syncs, stages, gpu_stages = 0.0, 0, -trailing_syncs, {}, {}
    gpu_ops = []
    for event in events:
        call = re.sub(r"_v\d+$", "", event.key)
        # GPU time of the event's own kernels (of a CPU operator: those it launched itself).
        device_us = getattr(event, "self_device_time_total", None) or getattr(
            event, "self_cuda_time_total", 0
        )
        if event.device_type == DeviceType.CPU and "::" in call and device_us > 0:
            gpu_ops.append([call, device_us / 1e6 / runs])
        if event.device_type == DeviceType.CUDA:
            # A named stage also shows on the GPU's timeline, as a span around its kernels.
            if getattr(event, "is_user_annotation", False):
                if call.startswith(_STAGE_PREFIX):
                    gpu_stages[call[len(_STAGE_PREFIX) :]] = device_us / 1e6 / runs
            else:
                kernel_us += device_us
        elif call.startswith(_STAGE_PREFIX):
            stages[call[len(_STAGE_PREFIX) :]] = event.cpu_time_total / 1e6 / runs
        elif call in _LAUNCH_CALLS:
            launches += event.count
        elif call in _SYNC_CALLS:
            syncs += event.count
    return {
        "kernel_s": kernel_us / 1e6 / runs,
        "launches": launches / runs,
        "syncs": max(syncs, 0) / runs,
        "stages": stages,
        "gpu_stages": gpu_stages,
        "gpu_ops": sorted(gpu_ops, key=lambda op: -op[1])[:GPU_OPS_LISTED],
    }


def training_batch(height, width, num_classes, device, seed=0, num_instances=8):
    """One synthetic training dict: random image, random labels, rectangular instances."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    sem_seg = torch.randint(0, num_classes, (height, width), generator=g)
    xy0 = torch.rand(num_instances, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
    wh = (torch.rand(num_instances, 2, generator=g) * 0.15 + 0.05) * torch.tensor([width, height])
    boxes = torch.cat([xy0, xy0 + wh], dim=1).floor()
    masks = torch.zeros(num_instances, height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        mask[y0:y1, x0:x1] = True
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.randint(0, NUM_THINGS, (num_instances,), generator=g)
    instances.gt_masks = BitMasks(masks)
    return {"image": image, "sem_seg": sem_seg, "instances": instances}


def training_step_fn(model, batch, optimizer=None, amp_dtype=None, scaler=None):
    """One forward + backward (+ optimizer step) of ``model`` in training mode."""
    device = model.device.type

    def step():
        model.train()
        with EventStorage():
            if amp_dtype is not None:
                with torch.autocast(device_type=device, dtype=amp_dtype):
                    losses = model(batch)
            else:
                losses = model(batch)
            loss = sum(losses.values())
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step


def _timed(fn, durations, device):
    """Calls ``fn()`` and appends its wall time in seconds (its GPU work done) to ``durations``."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    durations.append(time.perf_counter() - start)


# The ways of saving training memory that the table compares: (norm layer, checkpointing).
MEMORY_SAVINGS = (
    ("BN", "none"),
    ("BN", "backbone"),
    ("BN", "backbone + semantic head"),
    ("iABN", "none"),
)


def training_memory(device, height, width):
    """Peak memory of one training step (forward + backward) for B0 and B5: with BatchNorm and
    LeakyReLU, with and without activation checkpointing in the backbone and in the semantic
    head, and with in-place activated BatchNorm (MODEL.EFFICIENTPS.INPLACE_ABN)."""
    rows = []
    for label, config in (
        ("EfficientPS-B0 (efficientps_b0_512x1024.yaml)", OURS_SMALL_CONFIG),
        ("EfficientPS-B5 (efficientps_b5.yaml)", OURS_CONFIG),
    ):
        for norm, checkpointing in MEMORY_SAVINGS:
            cfg = ours_config(device, config)
            cfg.MODEL.EFFICIENTNET.ACTIVATION_CHECKPOINTING = checkpointing != "none"
            cfg.MODEL.SEM_SEG_HEAD.ACTIVATION_CHECKPOINTING = "head" in checkpointing
            cfg.MODEL.EFFICIENTPS.INPLACE_ABN = norm == "iABN"
            torch.manual_seed(0)
            model = build_model(cfg)
            batch = [training_batch(height, width, NUM_CLASSES, device)]
            step = training_step_fn(model, batch)
            step()  # warm-up: lazily created state, allocator pools
            durations = []  # the step alone, not the memory probe's gc and malloc_trim
            peak = peak_memory_increase_mib(
                functools.partial(_timed, step, durations, device), device
            )
            rows.append(
                {
                    "model": label,
                    "norm": norm,
                    "checkpointing": checkpointing,
                    "size": f"{height}x{width}",
                    "peak_mib": peak,
                    "step_s": durations[0],
                }
            )
            logger.info("training memory %s", rows[-1])
            del model, batch, step
            _release_free_memory()
    return rows


def training_speed(models, device, height, width, warmup, repeats, precisions, on_row=None):
    """Training iterations/s, slowest timed step, peak GPU memory (of one step after the timed
    ones) and, from a profile of one more step, the GPU-busy fraction, kernel launches and host
    waits per step, at one crop (CUDA only), for each of ``precisions`` (None: float32, else an AMP
    dtype); ``on_row(rows)`` after each row. The slowest step shows what the median hides: on an
    H200 (2026-11-28), B5 under bf16 AMP took a median 0.110 s per step but 1.1 s in 2 of 10."""
    rows = {}
    autotuning = torch.backends.cudnn.benchmark
    for name, model in models.items():
        # Panoptic FPN trains as Detectron2 ships it, without cuDNN autotuning (CUDNN_BENCHMARK
        # False): with it, every new count of foreground ROIs re-tunes its mask head's convs
        # inside the timed steps (about a minute each on an H200). EfficientPS keeps autotuning
        # out of its ROI heads itself (EfficientPS.forward).
        torch.backends.cudnn.benchmark = autotuning and name != THEIRS
        num_classes = NUM_CLASSES if name != THEIRS else NUM_CLASSES - NUM_THINGS + 1
        batch = [training_batch(height, width, num_classes, device)]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        for dtype in precisions:
            scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            step = training_step_fn(model, batch, optimizer, dtype, scaler)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
            peak = peak_memory_increase_mib(step, device)
            key = f"{name} {'fp32' if dtype is None else str(dtype).replace('torch.', '')}"
            rows[key] = {
                "iter_per_s": 1 / statistics.median(times),
                "slowest_step_s": max(times),
                "peak_mib": peak,
            }
            if device.startswith("cuda"):  # launch-bound or compute-bound, as for inference
                profiled = gpu_profile(step, runs=1)
                rows[key]["busy"] = profiled["kernel_s"] * rows[key]["iter_per_s"]
                rows[key]["launches"] = profiled["launches"]
                rows[key]["syncs"] = profiled["syncs"]
                rows[key]["gpu_ops"] = profiled["gpu_ops"]
            logger.info("training %s: %s", key, rows[key])
            if on_row is not None:
                on_row(rows)
        model.eval()
    torch.backends.cudnn.benchmark = autotuning
    return rows


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        # The widest vector instructions torch's CPU kernels use here ("AVX2", "AVX512", ...),
        # and whether oneDNN has native bfloat16 kernels (AVX512-BF16 or AMX): without them, a
        # bf16 row on the CPU times an emulation.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": cpu_bf16_kernels(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        # PyTorch's huge pages for large CPU tensors: a quarter off B5's time at 1024x2048 here.
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    return info


def cpu_bf16_kernels():
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def wait_for_load(limit, max_wait):
    """Waits (up to ``max_wait`` s) until the 1-minute load average drops below ``limit``."""
    if limit is None:
        return
    deadline = time.time() + max_wait
    while load_average() is not None and load_average() >= limit and time.time() < deadline:
        logger.info("load average %.2f >= %.2f, waiting", load_average(), limit)
        time.sleep(10)


def _fmt(value, digits=2):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def markdown(report):
    s = report["settings"]
    m = report["machine"]
    lines = [
        "# EfficientPS-B5 vs Detectron2 Panoptic FPN R50",
        "",
        f"Machine: {m['cpu']}"
        + (f" ({m['cpu_capability']})" if m.get("cpu_capability") else "")
        + (", bf16 kernels" if m.get("cpu_bf16_kernels") else "")
        + f", {m['usable_cores']} usable cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), torchvision {m['torchvision']}, detectron2 "
        f"{m['detectron2']}, device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "")
        + (f", THP_MEM_ALLOC_ENABLE={m['thp_mem_alloc']}" if m.get("thp_mem_alloc") else "")
        + ".",
        f"1-minute load average: {report['load_average']} (start, per size, end); "
        "a load above the core count means other processes shared the CPU during the timing.",
        f"Latency: batch 1, eval mode, full panoptic inference (pre- and post-processing "
        f"included), {s['warmup']} warm-up run(s), then the median (min) of "
        f"{s['repeats']} runs per size; models interleaved run by run (compiled rows: after "
        "the others, with each other). Peak memory: the last warm-up run, above what was "
        "allocated before it; '+N kept' (GPU): what the first two runs left reserved for good, "
        "such as a CUDA graph's memory pool (captured at a size's second run), which the "
        "replays reuse and the peak does not see.",
        "Both models: random weights with BN statistics set from one image; test score threshold "
        "0 and panoptic confidence threshold 0, so each keeps its 100 best detections "
        "(TEST.DETECTIONS_PER_IMAGE) and the mask head and fusion do the same amount of work.",
        "FLOPs: fvcore (Detectron2's FlopCountAnalysis), one multiply-add = one flop.",
        "",
    ]
    sizes = s["sizes"]
    header = ["model", "params (M)"]
    for size in sizes:
        header += [f"GFLOPs {size}", f"latency {size} (s)", f"peak mem {size} (MiB)"]
    header += ["detections / thing segments"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["models"].items():
        cells = [name, _fmt(row["params"] / 1e6, 1)]
        for size in sizes:
            r = row["sizes"].get(size, {})
            flops = r.get("flops")
            latency = r.get("latency_s")
            cells += [
                _fmt(flops / 1e9, 1) if flops else "n/a",
                (
                    f"{_fmt(statistics.median(latency))} ({_fmt(min(latency))})"
                    if latency
                    else "n/a"
                ),
                _fmt(r.get("peak_mib"), 0)
                + (f" (+{r['kept_mib']:.0f} kept)" if r.get("kept_mib", 0) >= 1 else ""),
            ]
        counts = {str(tuple(r.get("detections", ()))) for r in row["sizes"].values()}
        cells.append(", ".join(sorted(counts)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Latency ratios (median):", ""]
    lines += ["| ratio | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, values in report["ratios"].items():
        lines.append("| " + label + " | " + " | ".join(_fmt(values.get(z)) for z in sizes) + " |")
    if report.get("fast_copy_build_s") is not None:
        lines += [
            "",
            f"Building the fused inference copy (once per weight change): "
            f"{report['fast_copy_build_s']:.2f} s.",
        ]
    if report.get("amp"):
        lines += ["", "AMP latency (median, s):", ""]
        lines += [
            "| model | dtype | " + " | ".join(sizes) + " |",
            "|---|---|" + "---|" * len(sizes),
        ]
        for key, per_size in report["amp"].items():
            name, dtype = key.rsplit(" ", 1)
            lines.append(
                f"| {name} | {dtype} | "
                + " | ".join(_fmt(per_size.get(z, {}).get("median_s"), 3) for z in sizes)
                + " |"
            )
    if report.get("dense"):
        lines += [
            "",
            "Dense network alone (backbone, FPN, semantic head, RPN head, proposal decoding), "
            "median (s):",
            "",
        ]
        lines += ["| path | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, per_size in report["dense"].items():
            cells = [
                _fmt(statistics.median(per_size[z]), 4) if z in per_size else "n/a" for z in sizes
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("gpu_profile"):
        lines += [
            "",
            "Per image, from torch.profiler: GPU-busy fraction (kernel time / median latency), "
            "kernel launches, host waits for the GPU (syncs and blocking copies), and the time "
            "in each stage of EfficientPS's inference on the host and on the GPU (ms, under the "
            "profiler: " + " / ".join(_STAGES) + "; a stage that waits for the GPU takes in, on "
            "the host, the GPU time of the stages before it):",
            "",
            "| model | size | GPU busy | launches | host waits | host ms by stage | "
            "GPU ms by stage |",
            "|---|---|---|---|---|---|---|",
        ]

        def by_stage(seconds):
            if not seconds:
                return "n/a"
            return " / ".join(_fmt(seconds.get(k, 0) * 1e3, 1) for k in _STAGES)

        for name, per_size in report["gpu_profile"].items():
            for z in sizes:
                if z in per_size:
                    row = per_size[z]
                    lines.append(
                        f"| {name} | {z} | {_fmt(row['busy'])} | {row['launches']:.0f} | "
                        f"{row['syncs']:.0f} | {by_stage(row.get('stages'))} | "
                        f"{by_stage(row.get('gpu_stages'))} |"
                    )
    if report.get("training"):
        lines += [
            "",
            f"Training at {s['train_size']} (batch 1; {THEIRS} without cuDNN autotuning, as "
            "Detectron2 ships it):",
            "",
        ]
        lines += [
            "| model, precision | iterations/s (median) | slowest step (s) "
            "| peak GPU memory (MiB) | GPU busy | launches | host waits |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, row in report["training"].items():
            cells = [_fmt(row["iter_per_s"])]
            for field, digits in (("slowest_step_s", 2), ("peak_mib", 0), ("busy", 2)):
                cells.append(_fmt(row[field], digits) if field in row else "n/a")
            for field in ("launches", "syncs"):
                cells.append(f"{row[field]:.0f}" if field in row else "n/a")
            lines.append(f"| {key} | {' | '.join(cells)} |")
    # The GPU profiles' operators (CUDA rows only): of inference per size, then of training.
    listed = {
        f"{name} {size}": row.get("gpu_ops")
        for name, per_size in report.get("gpu_profile", {}).items()
        for size, row in per_size.items()
    }
    listed.update({key: row.get("gpu_ops") for key, row in report.get("training", {}).items()})
    listed = {key: ops for key, ops in listed.items() if ops}
    if listed:
        lines += [
            "",
            "GPU ms per image (inference) or per step (training) of the operators whose kernels "
            "took the most:",
            "",
        ]
        for key, ops in listed.items():
            lines.append(f"- {key}: " + ", ".join(f"{op} {_fmt(t * 1e3, 1)}" for op, t in ops))
    if report.get("training_memory"):
        lines += [
            "",
            "Peak memory of one training step (forward + backward, batch 1), by norm layer "
            "(BN + LeakyReLU, or in-place activated BN) and activation checkpointing:",
            "",
            "| model | size | norm | checkpointing | peak memory (MiB) | step time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["training_memory"]:
            lines.append(
                f"| {row['model']} | {row['size']} | {row['norm']} | "
                f"{row['checkpointing']} | {_fmt(row['peak_mib'], 0)} | {_fmt(row['step_s'], 1)} |"
            )
    failed = {name: row["error"] for name, row in report["models"].items() if "error" in row}
    if report.get("compiled_training_error"):
        failed[f"{OURS_COMPILED_TRAINING} training"] = report["compiled_training_error"]
    if failed:
        lines += ["", "Failed (left out from there on):", ""]
        lines += [f"- {name}: {error}" for name, error in failed.items()]
    if report.get("unfinished"):
        lines += ["", f"Unfinished: stopped during {report['unfinished']}."]
    lines += ["", f"Total benchmark time: {report['total_s']:.0f} s.", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results", help="folder for the results")
    parser.add_argument(
        "--sizes", nargs="+", default=["512x1024", "1024x2048"], help="input sizes HxW"
    )
    parser.add_argument(
        "--repeats",
        nargs="+",
        type=int,
        default=None,
        help="timed runs per size (one number for all sizes, or one per size; default: 5 for "
        "the first size, 3 for the others)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed runs per size and model (default: 3 on CUDA, where a size's CUDA graph is "
        "captured at its second run, so that the last one measures a replay; 1 elsewhere)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["ours-fast", "theirs"],
        choices=list(MODEL_KEYS) + ["all"],
        help="what to time: ours-fast (MODEL.EFFICIENTPS.FAST_INFERENCE), ours (plain), ours-r50 "
        "(EfficientPS on ResNet-50, fast), theirs (Panoptic FPN as shipped), theirs-fused "
        "(Panoptic FPN with fuse_for_inference), all (these five), ours-onnx (ours exported to "
        "ONNX, run by onnxruntime on the CPU)",
    )
    parser.add_argument(
        "--training-memory",
        default="512x1024",
        help="size for the training-memory table (B0/B5, with/without checkpointing); '' skips",
    )
    parser.add_argument("--train-size", default="1024x2048", help="crop for training speed (GPU)")
    parser.add_argument(
        "--amp-dtypes", nargs="+", default=["float16", "bfloat16"], help="AMP dtypes (GPU)"
    )
    parser.add_argument(
        "--train-precisions",
        nargs="+",
        default=None,
        choices=["float32", "float16", "bfloat16", "none"],
        help="training rows (GPU): float32 and/or AMP dtypes, or none (default: float32 and the "
        "first --amp-dtypes; --quick: bfloat16, as the first step of each precision autotunes "
        "cuDNN for a minute or more)",
    )
    parser.add_argument(
        "--compiled-training",
        action="store_true",
        help="also train B5 with MODEL.EFFICIENTPS.COMPILE_TRAINING (torch.compile of the "
        "backbone and semantic head; GPU), last before the training-memory section: compiling "
        "the forward and backward graphs takes minutes",
    )
    parser.add_argument(
        "--wait-for-load",
        type=float,
        default=None,
        help="wait before each timing until the 1-minute load average is below this",
    )
    parser.add_argument("--max-wait", type=float, default=120, help="longest wait for the load")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=None,
        choices=list(PATHS) + ["none"],
        help="EfficientPS-B5 fast also run these ways, a row each (default: all on CUDA; on "
        "the CPU bf16 where oneDNN has native bfloat16 kernels, else none): "
        + ", ".join(f"{k} {v}" for k, v in PATHS.items()),
    )
    parser.add_argument(
        "--compile-sizes",
        nargs="*",
        default=None,
        help="sizes at which to time the compiled path (compiling takes about a minute per "
        "size on a GPU; default: every size, --quick: the largest)",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also time the dense network alone (always on CUDA)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a GPU run of a few minutes: --warmup 3 --repeats 10 --no-flops --training-memory "
        "'' --amp-dtypes bfloat16 --train-precisions bfloat16, compiled path at the largest size "
        "only, 5 training iterations per row (options given beside it win; on one H200 its "
        "inference sections took 1 min 45 s with model building, 2026-11-28)",
    )
    args = parser.parse_args(argv)
    if args.quick:  # its settings as defaults: options given beside it still win
        parser.set_defaults(
            warmup=3,
            repeats=[10],
            no_flops=True,
            training_memory="",
            amp_dtypes=["bfloat16"],
            train_precisions=["bfloat16"],
        )
        args = parser.parse_args(argv)
        if args.compile_sizes is None:
            args.compile_sizes = args.sizes[-1:]
    if args.paths is None:
        if args.device.startswith("cuda"):
            args.paths = list(DEFAULT_CUDA_PATHS)
        else:  # without native kernels, a bf16 row would time an emulation
            args.paths = ["bf16"] if cpu_bf16_kernels() else []
    args.paths = [p for p in args.paths if p != "none"]
    if args.compile_sizes is None:
        args.compile_sizes = list(args.sizes)
    if args.train_precisions is None:
        args.train_precisions = ["float32"] + args.amp_dtypes[:1]
    args.train_precisions = [p for p in args.train_precisions if p != "none"]
    # Checked here, not after minutes of model building and timing.
    if args.repeats is None:
        args.repeats = [5] + [3] * (len(args.sizes) - 1)
    if len(args.repeats) not in (1, len(args.sizes)) or min(args.repeats) < 1:
        parser.error(
            f"--repeats takes one positive number, or one per size ({len(args.sizes)} sizes), "
            f"got {args.repeats}."
        )
    if len(args.repeats) == 1:  # one number for all sizes
        args.repeats = args.repeats * len(args.sizes)
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    if args.warmup < 0 or (args.warmup == 0 and not args.no_memory):
        parser.error(
            f"--warmup {args.warmup}: peak memory is measured on the last warm-up run, so give "
            "--warmup 1 or more, or --no-memory with --warmup 0."
        )
    named = [("--sizes", s) for s in args.sizes] + [("--train-size", args.train_size)]
    named += [("--compile-sizes", s) for s in args.compile_sizes]
    named += [("--training-memory", args.training_memory)] if args.training_memory else []
    for flag, text in named:
        try:
            _size(text)
        except ValueError:
            parser.error(f"{flag}: '{text}' is not a size HxW (e.g. 512x1024).")
    try:  # the results are first written after the models are built
        check_writable_folder(args.output, "--output")
    except ValueError as e:
        parser.error(str(e))
    return args


def _image(size):
    """The random test image of one size (the same for every section that times that size)."""
    height, width = _size(size)
    generator = torch.Generator().manual_seed(height * 100_000 + width)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _size(text):
    height, width = (int(v) for v in text.lower().split("x"))
    if height < 1 or width < 1:
        raise ValueError(f"'{text}' is not a size HxW.")
    return height, width


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    started = time.perf_counter()
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    report = {
        "machine": machine_info(device),
        "settings": {
            "sizes": args.sizes,
            "repeats": dict(zip(args.sizes, args.repeats)),
            "warmup": args.warmup,
            "ours_config": OURS_CONFIG + " (SyncBN -> BN)",
            "theirs_config": THEIRS_CONFIG + " (MODEL.WEIGHTS='', Cityscapes class counts)",
            "score_thresh_test": 0.0,
            "panoptic_confidence_thresh": 0.0,
            "detections_per_image": 100,
            "train_size": args.train_size,
        },
        "load_average": [load_average()],
        "models": {},
        "ratios": {},
    }
    names = model_names(args.models) + [path_name(p) for p in args.paths]
    report["settings"]["paths"] = {path_name(p): PATHS[p] for p in args.paths}
    report["settings"]["compile_sizes"] = args.compile_sizes
    compiled = {path_name(p) for p in args.paths if PATHS[p].get("compile")}

    def save(section_done=None, next_section=None):
        """Writes results.json and results.md as they stand (atomically): a run stopped by a
        timeout still leaves every finished section."""
        report["total_s"] = time.perf_counter() - started
        report["ratios"] = latency_ratios(report, args.sizes)
        if next_section:
            report["unfinished"] = next_section
        else:
            report.pop("unfinished", None)
        text = markdown(report)
        atomic_write(
            os.path.join(args.output, "results.json"),
            lambda f: json.dump(report, f, indent=2),
            "w",
        )
        atomic_write(os.path.join(args.output, "results.md"), lambda f: f.write(text), "w")
        return text

    models, ours, theirs = build_models(device, names)
    for name, (model, _) in models.items():
        report["models"][name] = {"params": sum(p.numel() for p in model.parameters()), "sizes": {}}

    if OURS_FAST in models:  # the fused copy is built on the first fast call; time it once
        ours.fast_inference = True
        _sync(device)
        start = time.perf_counter()
        ours._inference_network()
        _sync(device)  # the folding's kernels run after the call returns
        report["fast_copy_build_s"] = time.perf_counter() - start
    for name in map(path_name, args.paths):
        # Each path's copy now, so that its first runs' '+N kept' is what running leaves
        # (graphs are captured at the second run of each size, compiled code made at the first).
        models[name][0]._inference_network()
    save(next_section="inference")

    runners = {name: run for name, (_, run) in models.items()}
    cuda = device.startswith("cuda")
    # The rows that run EfficientPS-B5 in PyTorch (not the onnxruntime one): their dense part.
    dense_rows = {OURS, OURS_FAST, *(path_name(p) for p in PATHS)}

    ours_flops = {}  # size: EfficientPS-B5's FLOPs, for the compiled rows timed later

    def measure(size, rows, repeats):
        """Latency (and memory) of ``rows`` at ``size``, then their dense network (CUDA or
        --dense) and GPU profile (CUDA), saving after each; a row that fails is reported and
        dropped from the rest of the run."""
        save(next_section=f"{size}: {', '.join(rows)}")
        image = _image(size)
        wait_for_load(args.wait_for_load, args.max_wait)
        report["load_average"].append(load_average())
        logger.info("timing %s: %s (load %s)", size, ", ".join(rows), report["load_average"][-1])
        times, counts, peaks, kept, failed = time_inference(
            rows,
            image,
            device=device,
            warmup=args.warmup,
            repeats=repeats,
            memory=not args.no_memory,
        )
        for name, error in failed.items():
            report["models"][name]["error"] = f"{size}: {error}"
            runners.pop(name)
        rows = {k: v for k, v in rows.items() if k not in failed}
        for name in rows:
            entry = report["models"][name]["sizes"].setdefault(size, {})
            entry["latency_s"] = times[name]
            entry["detections"] = counts[name]
            entry["peak_mib"] = peaks.get(name)
            if name in kept:
                entry["kept_mib"] = kept[name]
            logger.info("%s %s: %s s, %s", name, size, times[name], entry)
        save(next_section=f"{size} extras")
        ours_rows = {n: models[n][0] for n in rows if n in dense_rows}
        if (cuda or args.dense) and ours_rows:
            dense = time_dense(ours_rows, image, device=device, warmup=args.warmup, repeats=repeats)
            for name, values in dense.items():
                report.setdefault("dense", {}).setdefault(name, {})[size] = values
            save(next_section=f"{size} extras")
        if cuda:
            inputs = [{"image": image}]
            for name, run in rows.items():
                latency = statistics.median(times[name])

                def once(run=run):
                    with torch.no_grad():
                        run(inputs)

                profiled = gpu_profile(once)
                profiled["busy"] = profiled.pop("kernel_s") / latency
                report.setdefault("gpu_profile", {}).setdefault(name, {})[size] = profiled
            save(next_section=f"{size} extras")
        return image

    for size, n in zip(args.sizes, args.repeats):
        # Compiled rows come last (after training): compiling takes a minute or more per size on
        # a GPU, and a run stopped by its time limit then loses only them.
        image = measure(size, {k: v for k, v in runners.items() if k not in compiled}, n)
        if not args.no_flops:  # counted on the plain models: the architectures, not the kernels
            ours.fast_inference = False
            r50 = models[OURS_R50][0] if OURS_R50 in models else None
            for prefix, model in ((OURS, ours), (THEIRS, theirs), (OURS_R50, r50)):
                if not any(name.startswith(prefix) for name in runners):
                    continue
                flops = count_flops(model, image)
                if prefix == OURS:
                    ours_flops[size] = flops
                for name in runners:
                    if name.startswith(prefix) and name not in compiled:
                        report["models"][name]["sizes"][size]["flops"] = flops
                logger.info("%s %s: %.1f GFLOPs", prefix, size, flops / 1e9)
            save(next_section=f"{size} extras")
        if cuda:
            report.setdefault("amp", {})
            amp_runners = {k: v for k, v in runners.items() if k in (OURS_FAST, THEIRS)}
            for dtype_name in args.amp_dtypes:
                dtype = getattr(torch, dtype_name)
                amp_times, _, _, _, _ = time_inference(
                    amp_runners,
                    image,
                    device=device,
                    warmup=args.warmup,
                    repeats=n,
                    amp_dtype=dtype,
                )
                for name, values in amp_times.items():
                    if values:
                        report["amp"].setdefault(f"{name} {dtype_name}", {})[size] = {
                            "median_s": statistics.median(values),
                            "images_per_s": 1 / statistics.median(values),
                        }

    # Each section from here saves as it starts: a run stopped in it reports it unfinished.
    train_dtypes = [None if p == "float32" else getattr(torch, p) for p in args.train_precisions]
    if cuda and train_dtypes:
        save(next_section="training")
        height, width = _size(args.train_size)
        # B5 once more with in-place activated BN (MODEL.EFFICIENTPS.INPLACE_ABN), same weights.
        ours_abn = copy.deepcopy(ours)
        convert_to_inplace_abn(ours_abn)
        train_models = {OURS: ours, OURS_IABN: ours_abn, THEIRS: theirs}
        report["training"] = training_speed(
            train_models,
            device,
            height,
            width,
            args.warmup,
            5,
            train_dtypes,
            on_row=lambda rows: (report.update(training=rows), save(next_section="training")),
        )
        del ours_abn, train_models
    for size, n in zip(args.sizes, args.repeats):
        compiled_rows = {k: v for k, v in runners.items() if k in compiled}
        if size in args.compile_sizes and compiled_rows:
            measure(size, compiled_rows, n)
            for name in compiled_rows:  # the architecture's, counted above
                entry = report["models"][name]["sizes"].get(size)
                if entry is not None and size in ours_flops:
                    entry["flops"] = ours_flops[size]
    if cuda and args.compiled_training and train_dtypes:
        save(next_section="compiled training")
        # The same B5 (its training rows above took a few SGD steps: no matter for the timing).
        ours.compile_training = True
        rows = report.setdefault("training", {})
        try:
            training_speed(
                {OURS_COMPILED_TRAINING: ours},
                device,
                *_size(args.train_size),
                args.warmup,
                5,
                train_dtypes,
                on_row=lambda new: (rows.update(new), save(next_section="compiled training")),
            )
        except Exception as e:  # reported, as a failing inference path is; the rest goes on
            report["compiled_training_error"] = f"{type(e).__name__}: {e}"
            logger.exception("compiled training failed")
        ours.compile_training = False
    save(next_section="training memory" if args.training_memory else None)
    models.clear()  # the models' memory back before the training-memory section
    runners.clear()
    del ours, theirs
    _release_free_memory()
    if args.training_memory:
        height, width = _size(args.training_memory)
        report["training_memory"] = training_memory(device, height, width)
    report["load_average"].append(load_average())
    text = save()
    print(text)
    return report


def latency_ratios(report, sizes):
    """{"A / B": {size: median latency ratio}} for the pairs of rows that were timed."""

    def median_latency(name, size):
        values = report["models"].get(name, {}).get("sizes", {}).get(size, {}).get("latency_s")
        return statistics.median(values) if values else None

    ratios = {}
    pairs = [
        (OURS_FAST, THEIRS),
        (OURS_R50, THEIRS),
        (OURS, THEIRS),
        (OURS_FAST, THEIRS_FUSED),
        (OURS_FAST, OURS),
        (OURS_ONNX, OURS),
    ] + [(path_name(p), THEIRS) for p in PATHS]
    for a, b in pairs:
        values = {}
        for size in sizes:
            x, y = median_latency(a, size), median_latency(b, size)
            if x is not None and y is not None:
                values[size] = x / y
        if values:
            ratios[f"{a} / {b}"] = values
    return ratios


if __name__ == "__main__":
    sys.exit(main() and 0)
