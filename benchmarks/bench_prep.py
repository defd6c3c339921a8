#!/usr/bin/env python3
"""Benchmark the prep stage's phases on synthetic enriched records.

    python3 benchmarks/bench_prep.py                       # 10k and 100k records
    python3 benchmarks/bench_prep.py --with-1m             # also 1M (minutes, several GB)
    python3 benchmarks/bench_prep.py --sizes 2000 --output /tmp/prep.json

Records come from ``data/make_demo_data.py`` (with its dirt: duplicates, bad lines, PII). Each
size runs in a fresh process so its peak RSS is its own; the tokenizer load is timed apart from
the phases. Prints a table and writes JSON (records/s, seconds per phase, peak memory, machine)
to ``benchmarks/results/prep.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = HERE / "results" / "prep.json"
DATA_DIR = HERE / "results" / "tmp"          # git-ignored
PHASES = ("read", "tokenize", "split", "decontaminate", "write")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # KiB on Linux


def machine_info() -> dict:
    import importlib.metadata as md

    import psutil

    cpu = platform.processor() or ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("tokenizers", "transformers", "datasketch", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_1m": round(os.getloadavg()[0], 2), "versions": versions}


def run_size(n: int, tokenizer: str, data_dir: Path) -> dict:
    """Generate ``n`` records, run every prep phase on them, return timings and memory."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "data"))
    import make_demo_data
    from llama_sft.config.presets import get_preset
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.prep.options import PrepConfig
    from llama_sft.prep.report import RejectLog
    from llama_sft.prep.stage import Prep, load_target_tokenizer, write_jsonl
    from llama_sft.prep.training_config import derive_training_config
    from llama_sft.prep.workers import gc_paused

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"bench-{n}.jsonl"
    t = time.perf_counter()
    path.write_bytes(b"\n".join(make_demo_data.build_lines(n, seed=11)) + b"\n")
    generate_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = load_target_tokenizer(tokenizer)
    fmt = PromptFormat.for_tokenizer(tok)
    tokenizer_s = time.perf_counter() - t
    rss_before = _rss_mb()
    cfg = PrepConfig(enriched=(str(path),), golden_size=150)
    preset = get_preset("135m")
    out = data_dir / f"bench-{n}-out"
    out.mkdir(exist_ok=True)
    phases = {}
    with gc_paused():                 # as run_prep runs every phase
        with open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects:
            run = Prep(cfg, RejectLog(rejects), tok, fmt, progress=False)
            for name, step in (("read", run.read), ("tokenize", lambda: run.measure_lengths(512)),
                               ("split", run.split), ("decontaminate", run.decontaminate)):
                t = time.perf_counter()
                step()
                phases[name] = time.perf_counter() - t
        t = time.perf_counter()
        n_train = sum(s == "train" for s in run.splits)
        values, how = derive_training_config(n_train, [k.tokens for k in run.kept], preset, 512)
        write_jsonl(out / "sft_dataset.jsonl", run.records(golden=False))
        write_jsonl(out / "golden_set.jsonl", run.records(golden=True))
        report = run.report(values, how, tokenizer, 512)
        (out / "prep_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        phases["write"] = time.perf_counter() - t
    total = sum(phases.values())
    return {"records": n, "kept": len(run.kept), "rejected": report["counts"]["rejected"],
            "workers": run.intake.worker_count(), "cpus": os.cpu_count(),
            "total_s": round(total, 3), "records_per_s": round(n / total, 1),
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "tokenize_records_per_s": round(n / phases["tokenize"], 1),
            "tokenizer_load_s": round(tokenizer_s, 3), "generate_s": round(generate_s, 3),
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_rss_over_baseline_mb": round(_peak_rss_mb() - rss_before, 1)}


def run_in_subprocess(n: int, tokenizer: str, data_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--tokenizer",
           tokenizer, "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker for {n} records failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    head = ["records", "kept", "total s", "rec/s", *[f"{p} s" for p in PHASES], "peak MB"]
    lines = [[f"{r['records']:,}", f"{r['kept']:,}", f"{r['total_s']:.1f}",
              f"{r['records_per_s']:,.0f}", *[f"{r['phases_s'][p]:.2f}" for p in PHASES],
              f"{r['peak_rss_mb']:,.0f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000],
                   help="record counts to benchmark")
    p.add_argument("--with-1m", action="store_true", help="also run 1,000,000 records")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir or hub id (default: the embedded model's)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where generated data goes")
    p.add_argument("--in-process", action="store_true",
                   help="run sizes in this process (peak memory is then the process's)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from llama_sft.config.presets import get_preset
        args.tokenizer = get_preset("135m").base_model
    if args.worker:
        print(json.dumps(run_size(args.worker, args.tokenizer, args.data_dir)))
        return 0
    sizes = args.sizes + ([1_000_000] if args.with_1m else [])
    rows = []
    for n in sizes:
        print(f"prep benchmark: {n:,} records ...", file=sys.stderr, flush=True)
        rows.append(run_size(n, args.tokenizer, args.data_dir) if args.in_process
                    else run_in_subprocess(n, args.tokenizer, args.data_dir))
    print(format_table(rows))
    result = {"benchmark": "prep", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine_info(), "tokenizer": args.tokenizer,
              "notes": "synthetic demo records with ~5% dirt; phases exclude data generation "
                       "and tokenizer load; peak_rss_mb is the worker process's ru_maxrss",
              "runs": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
