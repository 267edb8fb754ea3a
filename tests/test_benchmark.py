"""benchmarks/benchmark.py at a tiny size: both models built, timed and reported in JSON and
Markdown, as the README's benchmark command writes them."""

import json
import os
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def benchmark():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    return benchmark


def test_benchmark_reports_both_models(benchmark, tmp_path):
    report = benchmark.main(
        [
            "--output",
            str(tmp_path),
            "--sizes",
            "64x128",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--models",
            "ours-fast",
            "ours-r50",
            "theirs",
            "--paths",
            "none",  # the default's bf16 row on a CPU with bf16 kernels is tested below
            "--training-memory",
            "",
            "--device",
            "cpu",
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"].keys() == {
        "EfficientPS-B5 fast",
        "EfficientPS-R50 fast",
        "PanopticFPN-R50",
    }
    ours, theirs = saved["models"]["EfficientPS-B5 fast"], saved["models"]["PanopticFPN-R50"]
    r50 = saved["models"]["EfficientPS-R50 fast"]
    assert 40e6 < r50["params"] < 46e6  # R50 trunk 23.5M (FrozenBN: no parameters) + FPN, heads
    assert 36.8e6 < ours["params"] < 45.0e6  # the B5 Cityscapes model, as the paper's 40.89M
    assert 40e6 < theirs["params"] < 50e6  # Panoptic FPN R50: 46M with Cityscapes classes
    for row in (ours, r50, theirs):
        entry = row["sizes"]["64x128"]
        assert len(entry["latency_s"]) == 2 and all(t > 0 for t in entry["latency_s"])
        assert entry["flops"] > 0
    ratio = saved["ratios"]["EfficientPS-B5 fast / PanopticFPN-R50"]["64x128"]
    assert ratio > 0
    assert saved["machine"]["torch"] and saved["machine"]["detectron2"]
    table = (tmp_path / "results.md").read_text()
    assert "| EfficientPS-B5 fast |" in table and "| PanopticFPN-R50 |" in table
    assert report["models"].keys() == saved["models"].keys()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left
    # On CUDA, the GPU profile's rows: stage times for EfficientPS, none for Panoptic FPN.
    profiled = {"busy": 0.5, "launches": 900, "syncs": 30.0}
    stages = {"dense": 0.010, "proposals": 0.002, "detection": 0.0035, "postprocess": 0.004}
    on_gpu = {"dense": 0.009, "detection": 0.001}
    ops = [["aten::convolution", 0.0042]]
    saved["gpu_profile"] = {
        "EfficientPS-B5 fast": {
            "64x128": {**profiled, "stages": stages, "gpu_stages": on_gpu, "gpu_ops": ops}
        },
        "PanopticFPN-R50": {"64x128": {**profiled, "stages": {}, "gpu_stages": {}}},
    }
    saved["machine"]["thp_mem_alloc"] = "1"  # a run under PyTorch's huge-page setting says so
    # The instruction set and bf16 kernels, which decide what a bf16 row on the CPU means.
    saved["machine"].update(cpu="Some CPU", cpu_capability="AVX512", cpu_bf16_kernels=True)
    table = benchmark.markdown(saved)
    assert ", THP_MEM_ALLOC_ENABLE=1." in table
    assert "Machine: Some CPU (AVX512), bf16 kernels, " in table
    saved["machine"]["cpu_bf16_kernels"] = False
    assert "Machine: Some CPU (AVX512), " in benchmark.markdown(saved)
    assert "bf16 kernels" not in benchmark.markdown(saved)
    assert (
        "| EfficientPS-B5 fast | 64x128 | 0.50 | 900 | 30 | 10.0 / 2.0 / 3.5 / 4.0 | "
        "9.0 / 0.0 / 1.0 / 0.0 |" in table
    )
    assert "| PanopticFPN-R50 | 64x128 | 0.50 | 900 | 30 | n/a | n/a |" in table
    assert "- EfficientPS-B5 fast 64x128: aten::convolution 4.2" in table
    # A training row's profile lists the operators that kept the GPU busiest.
    saved["settings"]["train_size"] = "64x128"
    saved["training"] = {
        "EfficientPS-B5 bfloat16": {
            "iter_per_s": 9.0,
            "slowest_step_s": 0.2,
            "peak_mib": 6000.0,
            "busy": 0.8,
            "launches": 3000,
            "syncs": 40,
            "gpu_ops": [["aten::cudnn_convolution", 0.0123], ["aten::add_", 0.002]],
        }
    }
    assert (
        "- EfficientPS-B5 bfloat16: aten::cudnn_convolution 12.3, aten::add_ 2.0"
        in benchmark.markdown(saved)
    )


def test_paths_failing_rows_compiled_rows_and_partial_results(benchmark, tmp_path, monkeypatch):
    """--paths rows and the dense-network table on the CPU. One path failing (on a GPU: a CUDA
    graph capture) loses only its own row; the compiled rows are timed after every other
    section, so that a time limit during the compilation loses only them (torch.compile stands
    in here: Inductor takes minutes on the CPU); a run that dies later (here in the training
    memory) leaves the finished sections on disk, marked unfinished."""
    import torch

    bf16, compiled = "EfficientPS-B5 fast bf16", "EfficientPS-B5 fast compiled-bf16"
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    build_models = benchmark.build_models

    def build_with_failing_bf16(device, names):
        models, ours, theirs = build_models(device, names)
        model, run = models[bf16]
        calls = []

        def fail_second_call(inputs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("capture failed")
            return run(inputs)

        models[bf16] = (model, fail_second_call)
        return models, ours, theirs

    timed = []
    time_inference = benchmark.time_inference

    def record(runners, *args, **kwargs):
        timed.append(sorted(runners))
        return time_inference(runners, *args, **kwargs)

    def stop(*args):
        raise RuntimeError("stopped")

    monkeypatch.setattr(benchmark, "build_models", build_with_failing_bf16)
    monkeypatch.setattr(benchmark, "time_inference", record)
    monkeypatch.setattr(benchmark, "training_memory", stop)
    argv = ["--output", str(tmp_path), "--sizes", "64x128", "--repeats", "2", "--warmup", "1"]
    argv += ["--models", "ours-fast", "--paths", "bf16", "compiled-bf16", "--dense"]
    with pytest.raises(RuntimeError, match="stopped"):
        benchmark.main(argv + ["--training-memory", "64x128", "--device", "cpu"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["paths"] == {
        bf16: {"dtype": "bfloat16"},
        compiled: {"compile": True, "dtype": "bfloat16"},
    }
    assert timed == [["EfficientPS-B5 fast", bf16], [compiled]]
    assert saved["models"][bf16]["error"] == "64x128: RuntimeError: capture failed"
    assert "64x128" not in saved["models"][bf16]["sizes"] and bf16 not in saved["dense"]
    for name in ("EfficientPS-B5 fast", compiled):
        entry = saved["models"][name]["sizes"]["64x128"]
        assert len(entry["latency_s"]) == 2 and entry["flops"] > 0
    assert set(saved["dense"]) == {"EfficientPS-B5 fast", compiled}
    assert saved["unfinished"] == "training memory"
    table = (tmp_path / "results.md").read_text()
    assert f"- {bf16}: 64x128: RuntimeError: capture failed" in table
    assert f"| {compiled} |" in table and "Dense network alone" in table
    assert "Unfinished: stopped during training memory" in table
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def test_quick_mode_settings(benchmark, monkeypatch):
    args = benchmark.parse_args(["--quick", "--device", "cuda"])
    assert (args.warmup, args.no_flops, args.training_memory) == (3, True, "")
    assert args.repeats == [10, 10]  # one per size
    assert args.paths == list(benchmark.PATHS) and args.compile_sizes == ["1024x2048"]
    # Training in bf16 only: each precision's first step autotunes cuDNN for a minute or more.
    assert args.train_precisions == ["bfloat16"]
    assert benchmark.parse_args(["--device", "cuda"]).train_precisions == ["float32", "float16"]
    none = ["--quick", "--device", "cuda", "--train-precisions", "none"]
    assert benchmark.parse_args(none).train_precisions == []  # no training section
    # On the CPU, a bf16 row where oneDNN has bfloat16 kernels (it would time an emulation else).
    for native, paths in ((False, []), (True, ["bf16"])):
        monkeypatch.setattr(benchmark, "cpu_bf16_kernels", lambda: native)
        assert benchmark.parse_args(["--device", "cpu"]).paths == paths
    assert benchmark.parse_args(["--device", "cpu", "--paths", "none"]).paths == []
    # What the GPU checks' dry run on the CPU gives beside --quick (they were overridden).
    args = benchmark.parse_args(["--quick", "--repeats", "2", "--warmup", "1", "--device", "cpu"])
    assert (args.warmup, args.repeats, args.no_flops) == (1, [2, 2], True)


def test_models_all_keeps_the_models_named_beside_it(benchmark):
    # "--models all ours-onnx" used to time the five models of "all" and drop the ONNX row.
    assert benchmark.model_names(["all", "ours-onnx"]) == [
        *benchmark.ALL_MODELS,
        benchmark.OURS_ONNX,
    ]
    assert benchmark.model_names(["ours", "all"]) == [
        benchmark.OURS,
        *(name for name in benchmark.ALL_MODELS if name != benchmark.OURS),
    ]
    assert benchmark.model_names(["ours-fast", "theirs"]) == [benchmark.OURS_FAST, benchmark.THEIRS]


def test_bad_command_lines_stop_before_any_model_is_built(benchmark, capsys):
    # Each used to fail after the models were built (or after the timings), with a traceback.
    assert benchmark.parse_args(["--sizes", "64x128"]).repeats == [5]  # was "needs 1 or 1"
    assert benchmark.parse_args([]).repeats == [5, 3]
    assert benchmark.parse_args(["--repeats", "2"]).repeats == [2, 2]  # one per size
    for argv, message in [
        (["--sizes", "64x128", "--warmup", "0"], "--warmup 0: peak memory is measured"),
        (["--sizes", "64x128", "96x128", "--repeats", "1", "2", "3"], "one per size (2 sizes)"),
        (["--sizes", "64,128"], "--sizes: '64,128' is not a size HxW"),
        (["--training-memory", "512"], "--training-memory: '512' is not a size"),
        # The results, written first after the models were built, failed there.
        (["--output", os.path.join(REPO, "README.md")], "README.md' is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as error:
            benchmark.parse_args(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err
    args = benchmark.parse_args(["--sizes", "64x128", "--warmup", "0", "--no-memory"])
    assert (args.warmup, args.repeats) == (0, [5])
    # By default 3 warm-up runs on CUDA (a size's graph is captured at its second), 1 elsewhere.
    assert benchmark.parse_args(["--device", "cpu"]).warmup == 1
    assert benchmark.parse_args(["--device", "cuda"]).warmup == 3


def test_gpu_profile_counts_launches_and_host_waits(benchmark):
    """The GPU rows' launches and host waits per image, from torch.profiler's averaged events."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, count, device_type=DeviceType.CPU, device_us=0.0, cpu_us=0.0, **kwargs):
        return SimpleNamespace(
            key=key,
            count=count,
            device_type=device_type,
            self_device_time_total=device_us,
            cpu_time_total=cpu_us,
            **kwargs,
        )

    events = [
        event("cudaLaunchKernel", 300),
        event("cuLaunchKernel", 30),
        event("cudaLaunchKernelExC_v11060", 30),  # CUPTI's versioned name
        event("cudaMemcpyAsync", 60),  # does not wait
        event("cudaStreamSynchronize", 20),
        event("cudaDeviceSynchronize", 1),  # the profiling's own, at the end
        event("aten::conv2d", 90),  # its kernels are its children's
        event("aten::cudnn_convolution", 90, device_us=4500.0),
        event("aten::copy_", 20, device_us=1500.0),
        event("void conv_kernel<...>", 90, DeviceType.CUDA, 4500.0),
        event("Memcpy DtoH (Device -> Pinned)", 20, DeviceType.CUDA, 1500.0),
        # A stage: its host time; on the GPU's timeline a span around kernels already counted.
        event("EfficientPS.detection", 3, cpu_us=7500.0),
        event("EfficientPS.detection", 3, DeviceType.CUDA, 8000.0, is_user_annotation=True),
    ]
    summary = benchmark.summarize_profile(events, runs=3, trailing_syncs=1)
    assert summary == {
        "kernel_s": 0.002,
        "launches": 120,
        "syncs": 20 / 3,
        "stages": {"detection": 0.0025},
        "gpu_stages": {"detection": 8000.0 / 1e6 / 3},
        "gpu_ops": [["aten::cudnn_convolution", 4500.0 / 1e6 / 3], ["aten::copy_", 0.0005]],
    }


def test_operator_calls_by_stage():
    """benchmarks/op_counts.py counts each inference stage's top-level operator calls; with a
    GPU's branches (one shifted NMS, the scatter fusion, the fewest crop chunks) the stages after
    the dense network make no more calls than with the CPU's, the postprocessing (the CPU's fusion
    loops over the instances) fewer."""
    from detectron2.modeling import build_model

    from tests.common import PERMISSIVE, tiny_config, training_input

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import op_counts
    finally:
        sys.path.pop(0)
    model = build_model(tiny_config(PERMISSIVE)).eval()
    inputs = [{"image": training_input(64, 96, [], [])["image"]}]
    cpu, outputs = op_counts.count_calls(model, inputs)
    with op_counts.gpu_branches():
        gpu, _ = op_counts.count_calls(model, inputs)
    assert len(outputs[0]["instances"]) > 10  # enough for the loop to cost more
    assert all(sum(cpu[stage].values()) > 0 for stage in ("dense", "proposals", "detection"))
    assert gpu["dense"] == cpu["dense"]
    for stage in ("proposals", "detection"):
        assert 0 < sum(gpu[stage].values()) <= sum(cpu[stage].values()), stage
    assert 0 < sum(gpu["postprocess"].values()) < sum(cpu["postprocess"].values())
    assert "aten::conv2d" not in cpu["proposals"]  # each call in its own stage
    # The ROI heads graphed (CUDA_GRAPH_ROI_HEADS): the box and mask stages one replay each.
    with op_counts.gpu_branches(), op_counts.graphed_roi_heads():
        graphed, graphed_outputs = op_counts.count_calls(model, inputs)
    assert graphed["detection"]["cuda::graph_replay"] == 2
    assert "aten::linear" not in graphed["detection"]  # the box head, inside the replay
    assert 0 < sum(graphed["detection"].values()) < sum(gpu["detection"].values())
    assert len(graphed_outputs[0]["instances"]) == len(outputs[0]["instances"])


def test_profiled_inference_shows_each_stage(benchmark):
    """EfficientPS names its inference stages for torch.profiler; the GPU profile reports the
    host's time in each (here profiled on the CPU)."""
    from detectron2.modeling import build_model
    from torch.profiler import ProfilerActivity, profile

    from tests.common import PERMISSIVE, tiny_config, training_input

    model = build_model(tiny_config(PERMISSIVE)).eval()
    inputs = [{"image": training_input(64, 96, [], [])["image"]}]
    model(inputs)  # builds the inference copy outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(inputs)
        elapsed = time.perf_counter() - start
    stages = benchmark.summarize_profile(prof.key_averages(), runs=1)["stages"]
    assert set(stages) == set(benchmark._STAGES)
    assert all(t > 0 for t in stages.values()) and sum(stages.values()) <= elapsed


def test_training_rows_autotune_as_each_model_ships(benchmark, monkeypatch):
    """On CUDA the benchmark turns cuDNN autotuning on. Panoptic FPN's training rows run without
    it, as Detectron2 ships it: its mask head would re-tune for every new count of foreground ROIs
    inside the timed steps. EfficientPS's keep it (its ROI heads turn it off themselves)."""
    import torch

    seen = {}

    class Model(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.weight = torch.nn.Parameter(torch.ones(1))

        @property
        def device(self):
            return self.weight.device

        def forward(self, batch):
            seen.setdefault(self.name, set()).add(torch.backends.cudnn.benchmark)
            return {"loss": self.weight.sum()}

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    names = (benchmark.OURS, benchmark.OURS_IABN, benchmark.THEIRS)
    models = {name: Model(name) for name in names}
    rows = benchmark.training_speed(models, "cpu", 32, 48, 1, 1, [None, torch.bfloat16])
    assert seen == {benchmark.OURS: {True}, benchmark.OURS_IABN: {True}, benchmark.THEIRS: {False}}
    assert len(rows) == 6 and torch.backends.cudnn.benchmark  # restored
    assert all(row["slowest_step_s"] * row["iter_per_s"] > 1 - 1e-9 for row in rows.values())
