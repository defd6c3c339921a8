"""benchmarks/bench_gpu.py (what gpu_check.sh runs on a GPU): its code path at a tiny shape on
the CPU, every framework and method, the same weights and examples for all."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from helpers import ROOT

SPEC = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(SPEC)
sys.modules["bench_gpu"] = bench_gpu
SPEC.loader.exec_module(bench_gpu)


def test_without_cuda_the_gpu_run_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench_gpu.main(["--shapes", "7b"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_every_framework_and_method_runs_at_a_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--shapes", "tiny", "--device", "cpu", "--seq-len", "64",
                           "--steps", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {(r["method"], r["framework"]): r for r in result["runs"]}
    assert set(runs) == {(m, f) for m in ("lora", "qlora") for f in ("ours", "trl", "hf")}
    for (method, framework), run in runs.items():
        assert run["tokens_per_s"] > 0 and len(run["losses"]) == 3
        assert all(math.isfinite(x) for x in run["losses"])
    for method in ("lora", "qlora"):
        ours = runs[(method, "ours")]
        # same weights, LoRA initialization and examples: the peers see the same losses
        for peer in ("trl", "hf"):
            assert ours["losses"] == pytest.approx(runs[(method, peer)]["losses"], rel=2e-3)
        block = result["comparison"][f"tiny/{method}"]
        assert block["trl"]["tokens_per_s_ratio"] == pytest.approx(
            ours["tokens_per_s"] / runs[(method, "trl")]["tokens_per_s"])
        # 2 x 16 x (q, k, v, o, gate, up, down) LoRA weights of the tiny shape, per layer
        assert ours["model_info"]["trainable"] == 2 * 16 * (128 + 96 + 96 + 128 + 3 * (64 + 128))
    assert set(result["targets"]) == {"ours_vs_trl_tokens_per_s", "first5_loss_diff"}
