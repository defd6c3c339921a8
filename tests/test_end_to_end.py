"""The whole chain on the tiny LLaMA: prep -> pilot -> train -> evaluate -> package -> verify,
each stage's main() reading what the previous one wrote, and every contract between them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_serve import check_demo_server

import llama_evaluate
import llama_package
import llama_pilot
import llama_train
import pipeline_sft_prep
from helpers import ROOT, hf_greedy
from llama_sft.files import sha256_file


@pytest.fixture(scope="module")
def enriched(tmp_path_factory) -> Path:
    """The first 400 lines of the committed demo data (dirt included)."""
    lines = (ROOT / "data" / "demo_enriched.jsonl").read_bytes().splitlines(keepends=True)[:400]
    path = tmp_path_factory.mktemp("e2e") / "enriched.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def test_chain_on_tiny_model(enriched, tiny_model_dir, tmp_path, capsys):
    wd = tmp_path
    sft, pilot, train = wd / "sft_output", wd / "pilot_output", wd / "training_output"
    tiny = str(tiny_model_dir)

    assert pipeline_sft_prep.main(["--enriched", str(enriched), "--output-dir", str(sft),
                                   "--tokenizer", tiny, "--golden-size", "24"]) == 0
    assert {p.name for p in sft.iterdir()} == {
        "sft_dataset.jsonl", "golden_set.jsonl", "training_config.json", "prep_report.json",
        "rejects.jsonl", "manifest.json"}
    prep_manifest = json.loads((sft / "manifest.json").read_text())
    assert prep_manifest["files"]["sft_dataset.jsonl"] == sha256_file(sft / "sft_dataset.jsonl")

    common = ["--base-model", tiny, "--report-to", "none", "--no-progress", "--batch-size", "4",
              "--dtype", "float32"]
    rc = llama_pilot.main(["--golden-set", str(sft / "golden_set.jsonl"), "--output-dir",
                           str(pilot), "--max-steps", "4", "--num-samples", "4",
                           "--max-new-tokens", "8", "--min-loss-drop", "-1", "--max-final-loss",
                           "100", "--min-stop-rate", "0", *common])
    pilot_report = json.loads((pilot / "pilot_evaluation.json").read_text())
    assert rc == 0 and pilot_report["verdict"] == "go"
    assert pilot_report["resources"]["full_run_tokens"] > 0

    assert llama_train.main(["--dataset", str(sft / "sft_dataset.jsonl"), "--golden-set",
                             str(sft / "golden_set.jsonl"), "--output-dir", str(train),
                             "--config", str(sft / "training_config.json"), "--max-steps", "4",
                             "--eval-steps", "2", *common]) == 0
    final = train / "final_model"
    train_manifest = json.loads((final / "manifest.json").read_text())
    # train records exactly the prep outputs it read
    assert train_manifest["inputs"]["dataset"]["sha256"] == prep_manifest["files"]["sft_dataset.jsonl"]
    assert train_manifest["inputs"]["golden_set"]["sha256"] == prep_manifest["files"]["golden_set.jsonl"]
    used = json.loads((final / "training_config.json").read_text())
    derived = json.loads((sft / "training_config.json").read_text())
    assert used["max_length"] == derived["max_length"]          # --config was applied
    assert used["max_steps"] == 4                                # the flag won over the file

    report_path = wd / "final_evaluation.json"
    assert llama_evaluate.main(["--adapter-path", str(final), "--dataset",
                                str(sft / "sft_dataset.jsonl"), "--split", "test", "--num-samples",
                                "6", "--max-new-tokens", "8", "--compare-base", "--output",
                                str(report_path), "--dtype", "float32"]) == 0
    report = json.loads(report_path.read_text())
    assert report["model"]["base_model"] == tiny
    assert report["finetuned"]["overall"]["examples"] == 6 and len(report["samples"]) == 6
    assert report["base"]["overall"]["examples"] == 6 and "exact_match" in report["delta"]["overall"]
    assert report["data"]["sha256"] == prep_manifest["files"]["sft_dataset.jsonl"]

    packages = wd / "packages"
    assert llama_package.main(["--adapter-path", str(final), "--output-dir", str(packages),
                               "--evaluation", str(report_path)]) == 0
    archive = next(packages.glob("*.tar.gz"))
    assert llama_package.main(["--verify", str(archive)]) == 0
    check = subprocess.run(["sha256sum", "-c", f"{archive.name}.sha256"], cwd=packages,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with tarfile.open(archive) as tar:
        names = {Path(m.name).name for m in tar.getmembers()}
    assert {"adapter_model.safetensors", "adapter_config.json", "prompt_format.json",
            "metadata.json", "SHA256SUMS", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)

    # a stage given a directory whose files changed says which file
    with open(sft / "sft_dataset.jsonl", "a") as fh:
        fh.write("\n")
    capsys.readouterr()
    assert llama_train.main(["--dataset", str(sft / "sft_dataset.jsonl"), "--output-dir",
                             str(wd / "again"), *common]) == 65
    err = capsys.readouterr().err
    assert "sft_dataset.jsonl changed" in err and err.count("\n") == 1
    assert not (wd / "again").exists()


@pytest.mark.slow
def test_main_job_on_embedded_model(tmp_path):
    """The README's main job (run_pipeline.py) on the embedded SmolLM2 model and demo data."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "run_pipeline.py", "--workdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "pipeline_summary.json").read_text())
    assert summary["pilot_verdict"] == "go"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["exact_match_finetuned"] >= summary["exact_match_base"] + 0.3
    _check_demo_gguf(tmp_path)
    check_demo_server(tmp_path)


def _check_demo_gguf(wd: Path) -> None:
    """The main job's GGUF files in llama.cpp against the fine-tuned model in transformers, on the
    golden prompts: f16 gives the same 16 greedy tokens wherever transformers' top-2 gap stays
    clear of rounding; q8_0's agreement is reported."""
    from llama_sft.data.records import read_sft_jsonl
    from llama_sft.model.loading import load_for_inference
    from llama_sft.package import gguf

    loaded = load_for_inference(wd / "training_output" / "final_model", dtype="float32",
                                device_map=None)
    model, tok, fmt = loaded.model, loaded.tokenizer, loaded.prompt_format
    f16, q8 = (gguf.load(next((wd / "packages").glob(f"*.{t}.gguf")), n_ctx=512)
               for t in ("f16", "q8_0"))
    clear = same_f16 = same_q8 = 0
    for record in read_sft_jsonl(str(wd / "sft_output" / "golden_set.jsonl"), None)[:24]:
        prompt = fmt.encode_record_prompt(tok, record)
        want, gaps = hf_greedy(model, prompt, 16)
        gap = min(gaps)
        same_q8 += gguf.greedy(q8, prompt, 16, []) == want
        if gap > 0.05:
            clear += 1
            same_f16 += gguf.greedy(f16, prompt, 16, []) == want
    print(f"demo GGUF: f16 identical on {same_f16}/{clear} clear-margin golden prompts; q8_0 "
          f"identical on {same_q8}/24")
    assert clear >= 12 and same_f16 == clear
