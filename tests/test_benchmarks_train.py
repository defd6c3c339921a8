"""benchmarks/bench_train.py: a toy-size end-to-end run of every framework, and its helpers.

No timing assertions: the smoke run checks that every framework trained the same examples for the
same steps, that the numbers in the result hang together, and that the GPU code path runs (on CPU,
at a tiny shape) where there is no GPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from helpers import ROOT, make_records, write_jsonl

SPEC = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(SPEC)
sys.modules["bench_train"] = bench_train
SPEC.loader.exec_module(bench_train)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory, tiny_model_dir):
    """One round of every default framework, 1 warm-up + 2 measured steps, on the tiny model."""
    tmp = tmp_path_factory.mktemp("bench-train")
    data = write_jsonl(tmp / "sft_dataset.jsonl",
                       make_records(48, "train") + make_records(4, "val", start=48))
    out = tmp / "train.json"
    rc = bench_train.main(["--models", "tiny", "--tiny-model-dir", str(tiny_model_dir),
                           "--dataset", str(data), "--config", "", "--steps", "2", "--warmup", "1",
                           "--repeats", "1", "--schedule", "round", "--max-load", "0",
                           "--retries", "0", "--probe-floor", "0", "--peak-seconds", "0.05",
                           "--dtype", "float32", "--output", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_smoke_every_framework_ran_the_same_examples(smoke_result):
    block = smoke_result["models"]["tiny"]
    assert smoke_result["complete"] is True
    assert list(block["frameworks"]) == list(bench_train.DEFAULT_FRAMEWORKS)
    assert [r["framework"] for r in smoke_result["runs"]] == list(bench_train.DEFAULT_FRAMEWORKS)
    assert block["same_examples"] is True
    for summary in block["frameworks"].values():
        assert summary["runs"] == 1 and summary["measured_steps"] == 2
        assert summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0
        assert 0 < summary["mfu_bf16"] < summary["mfu_fp32"]
    runs = {r["framework"]: r for r in smoke_result["runs"]}
    assert all(len(r["steps"]) == 3 for r in runs.values())
    # --probe-floor 0: the matmul probe is read before and after each run but flags nothing
    assert all(len(r["probe_gflops"]) == 2 and min(r["probe_gflops"]) > 0
               and r["cores_shared"] is False for r in runs.values())
    # Same batches in the same order: equal real-token counts (padding not counted) ...
    tokens = {fw: [s["tokens"] for s in runs[fw]["steps"]] for fw in runs}
    for fw in ("trl_default", "trl_padding_free", "hf_maxlen"):
        assert tokens[fw] == tokens["ours"], fw
        assert [s["supervised_tokens"] for s in runs[fw]["steps"]] == \
            [s["supervised_tokens"] for s in runs["ours"]["steps"]]
    # ... and the same first loss: LoRA B starts at zero, so step 1 is the base model's loss,
    # normalised by the supervised tokens of the step in every framework.
    first = runs["ours"]["steps"][0]["loss"]
    for fw in ("trl_default", "trl_padding_free", "hf_maxlen"):
        assert runs[fw]["steps"][0]["loss"] == pytest.approx(first, rel=1e-4), fw
    assert runs["hf_maxlen"]["settings"]["padded_to"] == 512     # the 135m preset's max_length
    assert runs["trl_packing"]["settings"]["padding_free"] is True


def test_smoke_flops_ratios_and_targets(smoke_result):
    block = smoke_result["models"]["tiny"]
    info = block["model_info"]
    # tiny LLaMA: 2 layers, hidden 64, kv 32, mlp 128; LoRA r=16 on all 7 projections
    assert info["trainable"] == 2 * 16 * (128 + 96 + 96 + 128 + 3 * (64 + 128))
    assert info["lm_head"] == 64 * 49152 and info["layers"] == 2 and info["attn_dim"] == 64
    flops = block["flops_per_token"]
    assert flops["total"] == pytest.approx(4 * info["frozen"] + 6 * info["trainable"] +
                                           12 * 2 * 64 * block["attention_context"])
    ours = block["frameworks"]["ours"]
    peak = max(smoke_result["peak"]["bf16"]["gflops"],
               smoke_result["peak_after"]["bf16"]["gflops"]) * 1e9
    assert ours["mfu_bf16"] == pytest.approx(ours["tokens_per_s"] * flops["total"] / peak)
    comparison = block["comparison"]
    for fw in bench_train.DEFAULT_FRAMEWORKS[1:]:
        assert comparison["ratios"][f"ours_over_{fw}"] == pytest.approx(
            ours["tokens_per_s"] / block["frameworks"][fw]["tokens_per_s"])
    assert comparison["trl_best"] in bench_train.TRL_BEST_CANDIDATES
    assert set(comparison["targets"]) == {"vs_trl_default", "vs_trl_best", "mfu_bf16"}
    for t in comparison["targets"].values():
        assert t["met"] == (t["value"] >= t["target"])
    assert "bench_gpu.py" in smoke_result["gpu"]
    machine = smoke_result["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and len(machine["load_average"]) == 3
    assert machine["versions"]["trl"] and machine["versions"]["torch"]
    assert all(math.isfinite(s["final_loss"]) for s in block["frameworks"].values())


def test_schedule_interleaves_ours_with_every_peer():
    order = bench_train.schedule(["ours", "trl_default", "hf_maxlen"], 2, "alternate")
    assert order == [(0, "ours"), (0, "trl_default"), (0, "ours"), (0, "hf_maxlen"),
                     (1, "hf_maxlen"), (1, "ours"), (1, "trl_default"), (1, "ours")]
    assert bench_train.schedule(["ours", "hf_maxlen"], 1, "round") == [(0, "ours"), (0, "hf_maxlen")]
    assert bench_train.schedule(["trl_default"], 1, "alternate") == [(0, "trl_default")]


def test_load_gate_waits_for_a_quiet_machine_within_its_budget(monkeypatch):
    loads = iter([3.0, 2.0, 1.0, 5.0, 5.0, 5.0])
    monkeypatch.setattr(bench_train.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    slept = []
    gate = bench_train.LoadGate(1.5, max_wait=600, budget=90, poll_s=30, sleep=slept.append)
    assert gate.wait("a") == {"load_1m": 1.0, "waited_s": 60, "quiet": True}
    assert gate.wait("b") == {"load_1m": 5.0, "waited_s": 30, "quiet": False}   # budget spent
    assert slept == [30, 30, 30]
    assert bench_train.LoadGate(0, 600, 600).wait("c")["quiet"] is True


def test_speed_gate_waits_until_the_matmul_probe_reaches_its_floor():
    rates = iter([100.0, 200.0, 400.0, 50.0, 60.0])
    slept = []
    gate = bench_train.LoadGate(1.5, max_wait=600, budget=90, poll_s=30, sleep=slept.append)
    assert gate.wait_for_speed("a", lambda: next(rates), 300.0) == 400.0
    assert gate.wait_for_speed("b", lambda: next(rates), 300.0) == 60.0    # budget spent
    assert slept == [30, 30, 30]
    assert gate.wait_for_speed("c", lambda: 1.0, 0.0) == 1.0                # floor 0: no wait
    assert slept == [30, 30, 30]


def test_matmul_probe_reads_a_plausible_rate():
    rate = bench_train.matmul_probe(seconds=0.05, n=128)
    assert 0.05 < rate < 1e5    # GFLOP/s of a CPU or GPU-less machine, not seconds or FLOP/s


def test_bad_arguments_are_reported_together(tmp_path, capsys):
    rc = bench_train.main(["--frameworks", "ours,unsloth", "--models", "70b", "--steps", "0",
                           "--dataset", str(tmp_path / "missing.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for part in ("--steps must be > 0", "--models: unknown 70b", "--frameworks: unknown unsloth",
                 "missing.jsonl not found"):
        assert part in err
