#!/usr/bin/env python3
"""The main job: prep -> pilot -> train -> evaluate -> package -> verify on the embedded model.

    make demo                              # set-up included; runs this script
    python3 run_pipeline.py                # the same, after `make setup`
    python3 run_pipeline.py --workdir ./demo_output --model-size 135m

Each stage runs as its own command, exactly as the README's workflow types it, with the outputs
under --workdir. The chain stops at the first stage that fails (a pilot no-go included). At the
end it prints where every artifact is and a summary table, and writes pipeline_summary.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from llama_sft.cli import HelpFormatter
from llama_sft.files import write_json

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--enriched", default=str(ROOT / "data" / "demo_enriched.jsonl"),
                        help="enriched input records")
    parser.add_argument("--workdir", default="demo_output", help="where every stage writes")
    parser.add_argument("--model-size", default="135m", help="preset for pilot, train and package")
    parser.add_argument("--pilot-steps", type=int, default=None,
                        help="pilot --max-steps (default: the pilot's own default)")
    parser.add_argument("--eval-split", default="test", help="split of sft_dataset.jsonl to evaluate")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="evaluation generation limit")
    return parser


def stage_commands(args, wd: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    sft, pilot, train = wd / "sft_output", wd / "pilot_output", wd / "training_output"
    report, packages = wd / "final_evaluation.json", wd / "packages"
    pilot_cmd = [py, "llama_pilot.py", "--golden-set", f"{sft}/golden_set.jsonl",
                 "--output-dir", str(pilot), "--model-size", args.model_size]
    if args.pilot_steps:
        pilot_cmd += ["--max-steps", str(args.pilot_steps)]
    return [
        ("prep", [py, "pipeline_sft_prep.py", "--enriched", args.enriched, "--output-dir", str(sft)]),
        ("pilot", pilot_cmd),
        ("train", [py, "llama_train.py", "--model-size", args.model_size, "--dataset",
                   f"{sft}/sft_dataset.jsonl", "--golden-set", f"{sft}/golden_set.jsonl",
                   "--output-dir", str(train), "--config", f"{sft}/training_config.json"]),
        ("evaluate", [py, "llama_evaluate.py", "--adapter-path", f"{train}/final_model",
                      "--dataset", f"{sft}/sft_dataset.jsonl", "--split", args.eval_split,
                      "--num-samples", "0", "--compare-base", "--max-new-tokens",
                      str(args.max_new_tokens), "--output", str(report)]),
        ("package", [py, "llama_package.py", "--adapter-path", f"{train}/final_model",
                     "--model-size", args.model_size, "--output-dir", str(packages),
                     "--evaluation", str(report), "--gguf", "f16,q8_0"]),
    ]


def run_stage(name: str, cmd: list[str]) -> tuple[int, float]:
    print(f"\n=== {name}: {shlex.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}",
          flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    return rc, time.time() - t0


def summarize(wd: Path, times: dict[str, float]) -> dict:
    def load(path: Path):
        return json.loads(path.read_text()) if path.exists() else {}

    pilot = load(wd / "pilot_output" / "pilot_evaluation.json")
    train = load(wd / "training_output" / "metrics_summary.json")
    evaluation = load(wd / "final_evaluation.json")
    packages = sorted((wd / "packages").glob("*.tar.gz"))
    sha = (Path(f"{packages[-1]}.sha256").read_text().split()[0] if packages and
           Path(f"{packages[-1]}.sha256").exists() else None)

    def metric(side: str, name: str):
        block = evaluation.get(side) or {}
        return (block.get("overall") or block).get(name)

    return {"pilot_verdict": pilot.get("verdict"),
            "eval_loss_before": train.get("first_eval_loss"),
            "eval_loss_after": train.get("best_eval_loss"),
            "exact_match_base": metric("base", "exact_match"),
            "exact_match_finetuned": metric("finetuned", "exact_match"),
            "package": str(packages[-1]) if packages else None, "package_sha256": sha,
            "stage_seconds": {k: round(v, 1) for k, v in times.items()},
            "total_seconds": round(sum(times.values()), 1),
            "artifacts": {"sft_output": str(wd / "sft_output"),
                          "pilot_report": str(wd / "pilot_output" / "pilot_evaluation.json"),
                          "final_model": str(wd / "training_output" / "final_model"),
                          "loss_curve": str(wd / "training_output" / "loss_curve.png"),
                          "evaluation": str(wd / "final_evaluation.json")}}


def print_summary(summary: dict) -> None:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("\n=== summary")
    rows = [("pilot verdict", summary["pilot_verdict"]),
            ("eval loss before -> after", f"{fmt(summary['eval_loss_before'])} -> "
                                          f"{fmt(summary['eval_loss_after'])}"),
            ("exact match base -> fine-tuned", f"{fmt(summary['exact_match_base'])} -> "
                                               f"{fmt(summary['exact_match_finetuned'])}"),
            ("package", summary["package"]), ("package sha256", summary["package_sha256"])]
    rows += [(f"time {k}", f"{v:.1f} s") for k, v in summary["stage_seconds"].items()]
    rows.append(("time total", f"{summary['total_seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("\nartifacts:")
    for key, value in summary["artifacts"].items():
        print(f"  {key:<12} {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wd = Path(args.workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    commands = stage_commands(args, wd)
    for name, cmd in commands:
        rc, seconds = run_stage(name, cmd)
        times[name] = seconds
        if rc != 0:
            print(f"error: stage {name} failed with exit code {rc}; the chain stops here "
                  f"(outputs so far are in {wd})", file=sys.stderr)
            return rc
    packages = sorted((wd / "packages").glob("*.tar.gz"))
    rc, times["verify"] = run_stage("verify", [sys.executable, "llama_package.py", "--verify",
                                               str(packages[-1])])
    if rc != 0:
        return rc
    summary = summarize(wd, times)
    write_json(wd / "pipeline_summary.json", summary)
    print_summary(summary)
    print(f"\nsummary: {wd / 'pipeline_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
