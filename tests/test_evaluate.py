"""llama_evaluate.py end to end on the tiny adapter: report, compare-base, gates, errors."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest

import llama_package
from helpers import ROOT, make_records, write_jsonl
from llama_evaluate import main
from llama_sft.adapter.source import open_adapter
from llama_sft.evaluate.gates import check_gates, parse_gates

FAST = ["--max-new-tokens", "6", "--batch-size", "3", "--dtype", "float32"]


def run_main_of(fn, argv):
    """``fn(argv)`` with stdout/stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_main(argv):
    return run_main_of(main, argv)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "golden_set.jsonl",
                       make_records(7, "golden"))


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, tiny_adapter_dir, golden):
    out_dir = tmp_path_factory.mktemp("eval")
    report_path = out_dir / "report.json"
    rc, stdout, stderr = run_main(["--adapter-path", tiny_adapter_dir, "--dataset", golden,
                                   "--output", report_path, "--num-samples", 5,
                                   "--compare-base", *FAST])
    return rc, stdout, stderr, out_dir, json.loads(report_path.read_text())


def test_help_is_instant():
    result = subprocess.run([sys.executable, str(ROOT / "llama_evaluate.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--fail-under" in result.stdout and "(default: 50)" in result.stdout
    code = ("import sys, llama_evaluate, llama_chat; "
            "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert imported.stdout.strip() == "[]"


def test_report_files_and_keys(compare_run, golden, tiny_adapter_dir, tiny_model_dir):
    rc, stdout, _, out_dir, report = compare_run
    assert rc == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.json"]
    assert set(report) == {"schema_version", "stage", "created", "settings", "model", "data",
                           "environment", "finetuned", "base", "delta", "gates", "samples"}
    settings = report["settings"]
    assert settings["base_model"] == str(tiny_model_dir)
    assert settings["num_samples"] == 5 and settings["max_new_tokens"] == 6
    assert settings["temperature"] == 0.0 and settings["quantization"] == "none"
    assert settings["max_length"] == 512  # the adapter's recorded training max_length (135m)
    data = report["data"]
    assert data["evaluated"] == 5 and data["records_matching"] == 7
    assert data["categories"] == {"classification": 2, "extraction": 2, "qa": 1}
    from llama_sft.files import sha256_file
    assert data["sha256"] == sha256_file(golden)
    model = report["model"]
    assert model["adapter_weights_sha256"] == sha256_file(
        tiny_adapter_dir / "adapter_model.safetensors")
    assert model["base_model_files"]["sha256"]["model.safetensors"] == sha256_file(
        tiny_model_dir / "model.safetensors")
    assert model["prompt_format"]["style"] == "chat_template"
    assert model["training_config"]["lora_r"] == 4
    assert report["gates"] == {"passed": True, "checks": []}
    # the human table: fine-tuned, base and delta columns
    assert "fine-tuned" in stdout and "delta" in stdout and "rouge_l" in stdout


def test_report_numbers_match_samples(compare_run):
    import sacrebleu

    report = compare_run[4]
    samples = report["samples"]
    assert [s["id"] for s in samples] == [f"ex-{i:05d}" for i in range(5)]
    for side in ("finetuned", "base"):
        overall = report[side]["overall"]
        gens = [s[side]["generations"][0] for s in samples]
        refs = [s["reference"] for s in samples]
        assert overall["examples"] == overall["generations"] == 5
        assert overall["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu([g["text"] for g in gens], [refs]).score)
        assert overall["rouge_l"] == pytest.approx(
            sum(g["scores"]["rouge_l"] for g in gens) / 5)
        tokens = sum(s[side]["response_tokens"] for s in samples)
        loss = sum(s[side]["loss"] * s[side]["response_tokens"] for s in samples) / tokens
        assert overall["loss_tokens"] == tokens and overall["loss"] == pytest.approx(loss)
        assert overall["perplexity"] == pytest.approx(math.exp(loss))
        assert overall["stop_rate"] == pytest.approx(sum(g["stopped"] for g in gens) / 5)
        assert all(g["generated_tokens"] <= 6 for g in gens)
        assert report[side]["speed"]["generated_tokens"] == sum(g["generated_tokens"] for g in gens)
        # two JSON references (extraction records 1 and 4)
        assert overall["json_examples"] == 2 and overall["json_valid"] is not None
        assert set(report[side]["per_category"]) == {"classification", "extraction", "qa"}
        assert report[side]["per_category"]["extraction"]["json_examples"] == 2
        assert report[side]["per_category"]["qa"]["json_valid"] is None
    delta = report["delta"]["overall"]
    for key in ("loss", "rouge_l", "bleu", "exact_match"):
        assert delta[key] == pytest.approx(report["finetuned"]["overall"][key]
                                           - report["base"]["overall"][key])
    assert set(report["delta"]["per_category"]) == {"classification", "extraction", "qa"}
    # the random LoRA weights change the model: the losses differ
    ft_loss, base_loss = report["finetuned"]["overall"]["loss"], report["base"]["overall"]["loss"]
    assert ft_loss != pytest.approx(base_loss)


def test_loss_matches_transformers_loss(compare_run, tiny_adapter_dir):
    """The per-example teacher-forced loss equals the model's own mean loss on that example."""
    import torch

    from llama_sft.data.collate import pad_collate
    from llama_sft.data.tokenize import encode_example
    from llama_sft.model.loading import load_for_inference

    report = compare_run[4]
    sample = report["samples"][1]
    loaded = load_for_inference(tiny_adapter_dir, dtype="float32")
    record = {"instruction": sample["instruction"], "context": sample["context"],
              "response": sample["reference"]}
    enc = encode_example(loaded.tokenizer, loaded.prompt_format, record, 512)
    batch = pad_collate([enc], loaded.tokenizer.pad_token_id)
    with torch.inference_mode():
        ft = loaded.model(**batch).loss.item()
        with loaded.model.disable_adapter():
            base = loaded.model(**batch).loss.item()
    assert sample["finetuned"]["response_tokens"] == enc.num_supervised
    assert sample["finetuned"]["loss"] == pytest.approx(ft, rel=1e-4)
    assert sample["base"]["loss"] == pytest.approx(base, rel=1e-4)
    rendered = loaded.prompt_format.render(loaded.tokenizer, record["instruction"],
                                           record["context"])
    assert sample["prompt"] == rendered


def test_gate_fails_under_threshold_and_still_writes_report(tmp_path, tiny_adapter_dir, golden):
    report_path = tmp_path / "r.json"
    rc, _, stderr = run_main(["--adapter-path", tiny_adapter_dir, "--dataset", golden,
                              "--output", report_path, "--num-samples", 3,
                              "--fail-under", "exact_match=1.0", "stop_rate=0", *FAST])
    assert rc == 1
    assert stderr.strip().splitlines()[-1].startswith("error: evaluation gate failed: exact_match")
    gates = json.loads(report_path.read_text())["gates"]
    assert gates["passed"] is False
    by_metric = {c["metric"]: c for c in gates["checks"]}
    assert by_metric["exact_match"]["passed"] is False and by_metric["stop_rate"]["passed"]
    assert by_metric["exact_match"]["reasons"] == [
        f"exact_match {by_metric['exact_match']['value']:.4g} < 1"]


def test_gate_passes(tmp_path, tiny_adapter_dir, golden):
    rc, _, _ = run_main(["--adapter-path", tiny_adapter_dir, "--dataset", golden,
                         "--output", tmp_path / "r.json", "--num-samples", 2,
                         "--fail-under", "exact_match=0", "bleu=0", *FAST])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["gates"]["passed"] is True


def test_check_gates_against_base():
    finetuned = {"exact_match": 0.6, "rouge_l": 0.5, "json_valid": None}
    base = {"exact_match": 0.5, "rouge_l": 0.7, "json_valid": None}
    result = check_gates({"exact_match": 0.5, "rouge_l": 0.4}, finetuned, base)
    assert result["passed"] is False
    assert [c["passed"] for c in result["checks"]] == [True, False]
    assert result["checks"][1]["reasons"] == ["rouge_l 0.5 is under the base model's 0.7"]
    missing = check_gates({"json_valid": 0.5}, finetuned, None)
    assert missing["passed"] is False and "not computed" in missing["checks"][0]["reasons"][0]
    assert check_gates({}, finetuned, base) == {"passed": True, "checks": []}


def test_parse_gates():
    assert parse_gates(["exact_match=0.5", "bleu=20"]) == ({"exact_match": 0.5, "bleu": 20.0}, [])
    gates, problems = parse_gates(["loss=1", "rouge_l", "chrf=x"])
    assert gates == {} and len(problems) == 3


def test_bad_adapter_path_is_one_line_exit_2(tmp_path, golden, capsys):
    rc = main(["--adapter-path", str(tmp_path / "missing"), "--dataset", str(golden),
               "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: adapter path") and "missing" in err
    assert not (tmp_path / "r.json").exists()


def test_not_an_adapter_dir_exit_2(tmp_path, golden, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["--adapter-path", str(tmp_path / "empty"), "--dataset", str(golden),
               "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not an adapter directory" in err


def test_mismatched_base_model_exit_2(tmp_path, tiny_adapter_dir, golden, capsys):
    rc = main(["--base-model", "meta-llama/Llama-2-7b-hf", "--adapter-path", str(tiny_adapter_dir),
               "--dataset", str(golden), "--output", str(tmp_path / "r.json"),
               "--num-samples", "50", "--use-4bit"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "was trained on" in err and "meta-llama/Llama-2-7b-hf" in err
    assert not (tmp_path / "r.json").exists()


def test_users_command_with_another_base_is_one_line_in_a_real_process(tmp_path, tiny_adapter_dir,
                                                                      golden):
    """As typed by the user, against an adapter trained on another base: one line, exit 2,
    before any model library is imported (so no library noise on stderr)."""
    command = [sys.executable, str(ROOT / "llama_evaluate.py"),
               "--base-model", "meta-llama/Llama-2-7b-hf", "--adapter-path", str(tiny_adapter_dir),
               "--dataset", str(golden), "--output", str(tmp_path / "final_evaluation.json"),
               "--num-samples", "50", "--use-4bit"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: adapter ")
    assert result.stdout == "" and not (tmp_path / "final_evaluation.json").exists()


def test_all_flag_problems_reported_at_once(tmp_path, capsys):
    rc = main(["--adapter-path", str(tmp_path / "nope"), "--dataset", str(tmp_path / "none.jsonl"),
               "--output", str(tmp_path), "--num-samples", "-1", "--num-return-sequences", "2",
               "--top-p", "0", "--fail-under", "perplexity=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    for needle in ("--num-samples", "--num-return-sequences > 1 needs sampling", "--top-p",
                   "perplexity=3", "adapter path", "dataset file not found", "is a directory"):
        assert needle in err


def test_changed_dataset_is_exit_65(tmp_path, tiny_adapter_dir, capsys):
    from llama_sft.files import write_manifest

    data = write_jsonl(tmp_path / "sft" / "golden_set.jsonl", make_records(2, "golden"))
    write_manifest(data.parent, stage="prep")
    with open(data, "a") as fh:
        fh.write(json.dumps(make_records(1, "golden", start=9)[0]) + "\n")
    rc = main(["--adapter-path", str(tiny_adapter_dir), "--dataset", str(data),
               "--output", str(tmp_path / "r.json")])
    assert rc == 65 and "changed since prep wrote it" in capsys.readouterr().err


def test_split_sampling_and_multiple_sequences(tmp_path, tiny_adapter_dir):
    records = make_records(3, "train") + make_records(2, "test", start=3)
    data = write_jsonl(tmp_path / "sft_dataset.jsonl", records)
    rc, _, _ = run_main(["--adapter-path", tiny_adapter_dir, "--dataset", data,
                         "--output", tmp_path / "r.json", "--split", "test", "--num-samples", 0,
                         "--temperature", "0.9", "--top-p", "0.95",
                         "--num-return-sequences", 2, *FAST])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["id"] for s in report["samples"]] == ["ex-00003", "ex-00004"]
    assert all(len(s["finetuned"]["generations"]) == 2 for s in report["samples"])
    overall = report["finetuned"]["overall"]
    assert overall["examples"] == 2 and overall["generations"] == 4
    assert "exact_match_any" in overall and report["base"] is None and report["delta"] is None


def test_unknown_split_records_is_exit_65(tmp_path, tiny_adapter_dir, golden, capsys):
    rc = main(["--adapter-path", str(tiny_adapter_dir), "--dataset", str(golden),
               "--output", str(tmp_path / "r.json"), "--split", "test"])
    assert rc == 65 and "no records with split 'test'" in capsys.readouterr().err


def test_users_command_shape_with_4bit(tmp_path, tiny_adapter_dir, tiny_model_dir, golden):
    """The user's command (recorded base named, --use-4bit) runs on CPU via bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    rc, _, _ = run_main(["--base-model", tiny_model_dir, "--adapter-path", tiny_adapter_dir,
                         "--dataset", golden, "--output", tmp_path / "final_evaluation.json",
                         "--num-samples", 50, "--use-4bit", "--max-new-tokens", 4])
    assert rc == 0
    report = json.loads((tmp_path / "final_evaluation.json").read_text())
    assert report["settings"]["quantization"] == "4bit"
    assert report["data"]["evaluated"] == 7


def test_package_archive_as_adapter_path(tmp_path, tiny_adapter_dir, golden):
    archive = package_archive(llama_package, tiny_adapter_dir, tmp_path)
    rc, _, _ = run_main(["--adapter-path", archive, "--dataset", golden,
                         "--output", tmp_path / "r.json", "--num-samples", 2, *FAST])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    from llama_sft.files import sha256_file
    assert report["model"]["package_sha256"] == sha256_file(archive)
    assert report["model"]["adapter_path"] == str(archive)


def package_archive(package, adapter_dir, tmp_path):
    """Build a package archive with llama_package's own CLI."""
    out = tmp_path / "packages"
    rc = package.main(["--adapter-path", str(adapter_dir), "--output-dir", str(out)])
    assert rc == 0
    archives = sorted(out.glob("*.tar.gz"))
    assert len(archives) == 1
    return archives[0]


def test_open_adapter_reads_a_directory_in_place(tiny_adapter_dir):
    with open_adapter(tiny_adapter_dir) as adapter:
        assert adapter.path == tiny_adapter_dir
        assert adapter.training_config["lora_r"] == 4
        assert adapter.manifest["stage"] == "train"


def test_bench_generation_smoke(tmp_path, tiny_model_dir):
    """benchmarks/bench_generation.py at toy size: both runs, identity check, result file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generation",
                                                  ROOT / "benchmarks" / "bench_generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results" / "generation.json"
    rc, stdout, _ = run_main_of(bench.main, ["--model", tiny_model_dir, "--num-prompts", 3,
                                             "--batch-size", 2, "--max-new-tokens", 4,
                                             "--output", out])
    assert rc == 0 and "speed-up" in stdout
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3 and result["batch_size"] == 2
    assert result["golden_set"].endswith("golden_set.jsonl")
    assert result["one_at_a_time"]["generated_tokens"] <= 12
    assert result["batched"]["tokens_per_second"] > 0
    assert result["speedup"] == pytest.approx(result["batched"]["tokens_per_second"]
                                              / result["one_at_a_time"]["tokens_per_second"])
    assert result["num_differ"] == len(result["differ"])
    assert result["identical"] is (result["num_differ"] == 0)
    assert result["identical"]  # float32: left padding does not change greedy outputs here
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["machine"]["versions"]



def test_trained_adapter_from_llama_train_beats_its_base(tmp_path, tiny_model_dir):
    """The chain train -> evaluate: a final_model/ from llama_train.py loads, and on records it
    was trained on its teacher-forced loss is under the base model's."""
    import llama_train

    records = make_records(24)
    data = write_jsonl(tmp_path / "sft_dataset.jsonl", records + make_records(4, "val", 100))
    out = tmp_path / "training_output"
    config = tmp_path / "training_config.json"
    config.write_text(json.dumps({"num_eval_samples": 0}))  # no sample generation while training
    assert llama_train.main(["--base-model", str(tiny_model_dir), "--dataset", str(data),
                             "--output-dir", str(out), "--config", str(config), "--batch-size", "4",
                             "--learning-rate", "5e-3", "--max-steps", "6", "--report-to", "none",
                             "--no-progress", "--dtype", "float32"]) == 0
    rc, stdout, _ = run_main(["--adapter-path", out / "final_model", "--dataset", data,
                              "--split", "train", "--num-samples", 6, "--output",
                              tmp_path / "final_evaluation.json", "--compare-base", *FAST])
    assert rc == 0
    report = json.loads((tmp_path / "final_evaluation.json").read_text())
    assert report["model"]["training_config"]["max_steps"] == 6
    assert report["delta"]["overall"]["loss"] < 0
    assert report["finetuned"]["overall"]["perplexity"] < report["base"]["overall"]["perplexity"]
