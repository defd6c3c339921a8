"""MLflow end to end on the tiny LLaMA: train -> evaluate -> package -> registry in one run,
read back with MLflow's own client; resume; the run record; no secrets; the default store."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

import llama_evaluate
import llama_package
import llama_train
from helpers import ROOT, make_records, write_jsonl
from llama_sft.adapter.directory import read_adapter_dir
from llama_sft.errors import EXIT_USAGE
from llama_sft.files import verify_manifest
from llama_sft.tracking import TRACKING_FILE, public_uri, safe_params, tracking_uri

mlflow = pytest.importorskip("mlflow")

FINAL_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
               "manifest.json", "metrics_summary.json", "prompt_format.json", "tokenizer.json",
               "tokenizer_config.json", "training_config.json", TRACKING_FILE}


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI on a SQLite file in tmp_path (artifacts: ./mlruns of the cwd)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(17))
    return uri


def train(tiny_model_dir, tmp_path, out, *extra) -> int:
    sft = write_jsonl(tmp_path / "data" / "sft_dataset.jsonl",
                      make_records(32) + make_records(8, "val", 100))
    return llama_train.main(["--base-model", str(tiny_model_dir), "--dataset", str(sft),
                             "--output-dir", str(out), "--batch-size", "4",
                             "--learning-rate", "5e-3", "--lora-r", "4", "--max-steps", "4",
                             "--eval-steps", "2", "--save-steps", "2", "--report-to", "mlflow",
                             "--no-progress", "--dtype", "float32", *map(str, extra)])


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_train_evaluate_package_register_in_one_run(tiny_model_dir, tmp_path, store):
    out = tmp_path / "run"
    assert train(tiny_model_dir, tmp_path, out) == 0
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("llama-sft").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["learning_rate"] == "0.005" and params["lora_r"] == "4"
    assert params["max_steps"] == "4" and params["stage"] == "train"
    assert params["lora_target_modules"].startswith("q_proj,k_proj,v_proj,o_proj")
    assert json.loads((out / "training_config.json").read_text()).keys() <= params.keys()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [0, 2, 4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == \
        [r["loss"] for r in rows if "loss" in r]
    assert "time" not in run.data.metrics     # the row's time is each metric's timestamp

    final = out / "final_model"
    assert {p.name for p in final.iterdir()} == FINAL_FILES
    record = json.loads((final / TRACKING_FILE).read_text())
    assert record == {"tracker": "mlflow", "tracking_uri": store, "experiment_id":
                      run.info.experiment_id, "run_id": run_id, "step": 4}
    assert json.loads((out / TRACKING_FILE).read_text())["run_id"] == run_id
    verify_manifest(out)                      # the record leaves both manifests intact
    verify_manifest(final)
    assert TRACKING_FILE in json.loads((final / "manifest.json").read_text())["files"]
    read_adapter_dir(final)
    assert artifact_paths(client, run_id) == {"loss_curve.png"} | {
        f"final_model/{name}" for name in FINAL_FILES}

    golden = write_jsonl(tmp_path / "data" / "golden_set.jsonl", make_records(4, "golden", 200))
    report_path = tmp_path / "final_evaluation.json"
    assert llama_evaluate.main(["--adapter-path", str(final), "--dataset", str(golden),
                                "--output", str(report_path), "--num-samples", "3",
                                "--max-new-tokens", "4", "--dtype", "float32", "--mlflow"]) == 0
    overall = json.loads(report_path.read_text())["finetuned"]["overall"]
    run = client.get_run(run_id)
    assert run.data.metrics["evaluate/exact_match"] == overall["exact_match"]
    assert run.data.metrics["evaluate/loss"] == pytest.approx(overall["loss"])
    assert [m.step for m in client.get_metric_history(run_id, "evaluate/rouge_l")] == [4]
    assert run.data.tags["llama_sft.evaluation_passed"] == "true"
    assert "evaluation/final_evaluation.json" in artifact_paths(client, run_id)

    packages = tmp_path / "packages"
    assert llama_package.main(["--adapter-path", str(final), "--output-dir", str(packages),
                               "--name", "tiny-sft", "--version", "1.0.0", "--evaluation",
                               str(report_path), "--register-model", "tiny-sft"]) == 0
    assert {"package/tiny-sft-1.0.0.tar.gz", "package/tiny-sft-1.0.0.tar.gz.sha256"} <= \
        artifact_paths(client, run_id)
    (version,) = client.search_model_versions("name='tiny-sft'")
    assert int(version.version) == 1 and version.run_id == run_id
    assert version.source == f"runs:/{run_id}/package/tiny-sft-1.0.0.tar.gz"
    assert version.tags["evaluate/exact_match"] == str(float(overall["exact_match"]))
    assert version.tags["package"] == "tiny-sft-1.0.0.tar.gz"
    assert len(client.search_runs([run.info.experiment_id])) == 1   # one run, every stage

    token = os.environ["HF_TOKEN"]
    assert not any(token in v or v.startswith("hf_") for v in run.data.params.values())


def test_resumed_training_continues_its_run_without_repeating_steps(tiny_model_dir, tmp_path,
                                                                    store):
    out = tmp_path / "run"
    assert train(tiny_model_dir, tmp_path, out) == 0
    run_id = json.loads((out / TRACKING_FILE).read_text())["run_id"]
    assert train(tiny_model_dir, tmp_path, out, "--resume", "auto") == 0   # from checkpoint-2
    client = mlflow.MlflowClient(store)
    assert [r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("llama-sft").experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [0, 2, 4]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_pilot_reports_to_mlflow(tiny_model_dir, tmp_path, store):
    import llama_pilot

    golden = write_jsonl(tmp_path / "golden_set.jsonl", make_records(6, "golden"))
    out = tmp_path / "pilot"
    llama_pilot.main(["--golden-set", str(golden), "--output-dir", str(out), "--base-model",
                      str(tiny_model_dir), "--batch-size", "6", "--report-to", "mlflow",
                      "--no-progress", "--dtype", "float32", "--num-samples", "2",
                      "--max-new-tokens", "4", "--max-steps", "3"])
    client = mlflow.MlflowClient(store)
    run = client.get_run(json.loads((out / "final_model" / TRACKING_FILE).read_text())["run_id"])
    assert run.data.params["stage"] == "pilot" and run.data.params["max_steps"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert {"loss_curve.png", "final_model/adapter_model.safetensors",
            "pilot/pilot_evaluation.json"} <= artifact_paths(client, run.info.run_id)


def test_mlflow_flags_without_a_recorded_run_fail_before_any_work(tiny_adapter_dir, tmp_path,
                                                                  store, capsys):
    golden = write_jsonl(tmp_path / "golden.jsonl", make_records(2, "golden"))
    report = tmp_path / "report.json"
    assert llama_evaluate.main(["--adapter-path", str(tiny_adapter_dir), "--dataset", str(golden),
                                "--output", str(report), "--mlflow"]) == EXIT_USAGE
    assert "--mlflow:" in capsys.readouterr().err and not report.exists()
    packages = tmp_path / "packages"
    assert llama_package.main(["--adapter-path", str(tiny_adapter_dir), "--output-dir",
                               str(packages), "--register-model", "x"]) == EXIT_USAGE
    assert "--register-model:" in capsys.readouterr().err and not packages.exists()


def test_no_secret_reaches_params_or_the_record(monkeypatch):
    token = "hf_" + secrets.token_hex(17)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    params = safe_params({"lora_r": 8, "hf_token": "anything", "wandb_api_key": "x",
                          "base_model": token, "note": "uses " + "k" * 40,
                          "max_new_tokens": 16, "lora_target_modules": ["q_proj", "v_proj"]})
    assert params == {"lora_r": "8", "max_new_tokens": "16",
                      "lora_target_modules": "q_proj,v_proj"}
    assert public_uri("https://user:pass@mlflow.example:5000/x?token=1") == \
        "https://mlflow.example:5000/x"


def test_default_store_is_sqlite_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert tracking_uri("sqlite:////elsewhere/mlflow.db") == "sqlite:////elsewhere/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri("sqlite:////elsewhere/mlflow.db") == "http://server:5000"


@pytest.mark.parametrize("script", ["llama_train.py", "llama_pilot.py", "llama_evaluate.py",
                                    "llama_package.py"])
def test_help_imports_neither_mlflow_nor_torch(script):
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print(sorted({'mlflow', 'torch'} & set(sys.modules))))\n"
            f"sys.argv = [{script!r}, '--help']\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "mlflow" in out.stdout and out.stdout.rstrip().endswith("[]")
