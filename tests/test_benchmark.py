"""benchmarks/benchmark.py at a tiny size: both models built, timed and reported in JSON and
Markdown, as the README's benchmark command writes them."""

import json
import os
import sys

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
