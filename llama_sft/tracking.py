"""MLflow tracking: one run per training job, with the evaluation and the package logged into it.

    python3 llama_train.py ... --report-to mlflow        # params, step/eval metrics, artifacts
    python3 llama_evaluate.py --adapter-path ./training_output/final_model ... --mlflow
    python3 llama_package.py --adapter-path ./training_output/final_model \\
        --evaluation ./final_evaluation.json --register-model support-bot

The store is ``MLFLOW_TRACKING_URI`` when it is set, else ``sqlite:///<cwd>/mlruns/mlflow.db``
with the artifacts beside it in ``./mlruns/`` (no server). The local default is SQLite because
MLflow 3's plain-directory store refuses to start (unless ``MLFLOW_ALLOW_FILE_STORE`` is set) and
has no model registry. The experiment is ``MLFLOW_EXPERIMENT_NAME``, else ``llama-sft``.

The run is recorded in ``tracking.json``: in the output directory when training starts (a resumed
run continues it) and in ``final_model/`` when that is written, where evaluation and packaging
find it; the directory's manifest lists it, and the package allowlist leaves it out (a local
store's path means nothing on another machine). Nothing token-shaped reaches MLflow: settings named
like a secret or whose value looks like a token are left out, and a recorded tracking URI keeps
no user, password or query.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llama_sft.errors import SECRET_ENV_VARS, UsageError
from llama_sft.files import git_commit, read_json, write_json
from llama_sft.package.contents import TOKEN_PATTERNS

TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "llama-sft"
DEFAULT_STORE = Path("mlruns") / "mlflow.db"
EVALUATION_PREFIX = "evaluate/"   # not eval_: training already logs eval_loss / eval_perplexity
SECRET_NAME = re.compile(r"(?i)(^|[_-])(token|secret|password|passwd|api[_-]?key|credentials?)$")
MAX_PARAM_LENGTH = 6000           # MLflow's limit on a parameter value
BATCH = 100                       # MLflow's limit on parameters per log_batch


def tracking_uri(recorded: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the store a run was recorded in, else the local default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or recorded or \
        f"sqlite:///{DEFAULT_STORE.resolve()}"


def public_uri(uri: str) -> str:
    """``uri`` without user, password, query or fragment (what may be written to a file)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return uri    # unchanged: urlunsplit would turn sqlite:////abs into sqlite://abs
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="",
                                     fragment=""))


def looks_secret(text: str) -> bool:
    """Token-shaped (the package scan's patterns) or the value of a token environment variable."""
    literals = [os.environ[v] for v in SECRET_ENV_VARS if len(os.environ.get(v, "")) >= 8]
    return any(p.search(text.encode()) for _, p in TOKEN_PATTERNS) or \
        any(lit in text for lit in literals)


def safe_params(values: dict[str, Any]) -> dict[str, str]:
    """MLflow params from a flat config: lists comma-joined, secrets left out."""
    params = {}
    for key, value in values.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if not SECRET_NAME.search(key) and not looks_secret(text):
            params[key] = text[:MAX_PARAM_LENGTH]
    return params


def numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``values`` (None, bools, strings and nested values left out)."""
    return {prefix + k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@functools.lru_cache(maxsize=None)
def client(uri: str):
    """An ``MlflowClient`` on ``uri`` (tracking and registry); a local SQLite file's folder is
    created."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run in a store; ``step`` is the training's last step (x of later metrics)."""

    uri: str
    run_id: str
    experiment_id: str
    step: int = 0

    @property
    def client(self):
        return client(self.uri)

    @classmethod
    def start(cls, stage: str, config: dict[str, Any],
              previous: dict[str, Any] | None = None) -> "TrackedRun":
        """A new run in the experiment with ``config`` as params, or the ``previous`` record's
        run continued (a resumed training) when the store still has it."""
        if previous is not None:
            run = cls.from_record(previous)
            if run.exists():
                run.client.update_run(run.run_id, status="RUNNING")
                return run
        uri = tracking_uri()
        mlflow_client = client(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = mlflow_client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else \
            mlflow_client.create_experiment(name)
        tags = {"llama_sft.stage": stage}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        info = mlflow_client.create_run(experiment_id, tags=tags).info
        run = cls(uri, info.run_id, experiment_id)
        run.log_params(safe_params({"stage": stage, **config}))
        return run

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TrackedRun":
        return cls(tracking_uri(record["tracking_uri"]), record["run_id"],
                   record["experiment_id"], record.get("step", 0))

    @classmethod
    def for_adapter(cls, adapter_path: str | os.PathLike, flag: str) -> "TrackedRun":
        """The run that trained ``adapter_path`` (a final_model/ dir); a usage error naming
        ``flag`` when it records none or its store does not have it."""
        record = read_record(adapter_path)
        if record is None:
            raise UsageError(f"{flag}: {adapter_path} records no MLflow run (no {TRACKING_FILE}); "
                             f"train with --report-to mlflow and give its final_model/ directory")
        run = cls.from_record(record)
        if not run.exists():
            raise UsageError(f"{flag}: MLflow run {run.run_id} of {adapter_path} is not in "
                             f"{public_uri(run.uri)}; set MLFLOW_TRACKING_URI to its store")
        return run

    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(self.run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def record(self, directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``directory/tracking.json`` naming this run and its store."""
        write_json(Path(directory) / TRACKING_FILE,
                   {"tracker": "mlflow", "tracking_uri": public_uri(self.uri),
                    "experiment_id": self.experiment_id, "run_id": self.run_id, **extra})

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    def log_metrics(self, values: dict[str, float], step: int,
                    timestamp_s: float | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        millis = int(timestamp_s * 1000) if timestamp_s else get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, millis, step)
                                                    for k, v in values.items()])

    def last_step(self, metric: str) -> int:
        """The highest step ``metric`` was logged at (-1: never)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)),
                   default=-1)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a directory as a folder named like it under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            inside = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.client.log_artifacts(self.run_id, str(path), inside)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def read_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``directory/tracking.json`` (None when ``directory`` is not a folder that has one)."""
    path = Path(directory) / TRACKING_FILE
    return read_json(path) if path.is_file() else None


def log_evaluation(run: TrackedRun, report: dict[str, Any],
                   report_path: str | os.PathLike) -> dict[str, float]:
    """The fine-tuned model's overall metrics (``evaluate/<metric>``, at the training's last
    step) and the report file (``evaluation/``) into the run; returns the metrics."""
    metrics = numbers(report["finetuned"]["overall"], EVALUATION_PREFIX)
    run.log_metrics(metrics, run.step)
    run.client.set_tag(run.run_id, "llama_sft.evaluation_passed",
                       str(report["gates"]["passed"]).lower())
    run.log_artifact(report_path, "evaluation")
    return metrics


def log_package(run: TrackedRun, archive: Path, *, register_as: str | None = None,
                evaluation: dict[str, Any] | None = None):
    """The archive (and its .sha256) into the run's ``package/``; with ``register_as``, a new
    version of that registered model from it, tagged with the evaluation metrics (the report's,
    else those the run holds from llama_evaluate.py --mlflow). Returns the version or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    for path in (archive, archive.with_name(archive.name + ".sha256")):
        if path.exists():
            run.log_artifact(path, "package")
    if register_as is None:
        return None
    if evaluation is not None:
        metrics = numbers(evaluation["finetuned"]["overall"], EVALUATION_PREFIX)
    else:
        metrics = {k: v for k, v in run.client.get_run(run.run_id).data.metrics.items()
                   if k.startswith(EVALUATION_PREFIX)}
    tags = {k: str(v) for k, v in metrics.items()}
    tags["package"] = archive.name
    try:
        run.client.create_registered_model(register_as)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return run.client.create_model_version(register_as, f"runs:/{run.run_id}/package/"
                                           f"{archive.name}", run_id=run.run_id, tags=tags)
