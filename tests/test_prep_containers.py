"""The prep stage's `datasets` inputs: parquet files and globs, save_to_disk directories and hub
datasets give the same outputs as the same records in JSONL or CSV; bad ones exit with the right
code and write nothing.

Runs on the tiny model's tokenizer and tens of records. The hub is never reached: a hub dataset is
read offline from a datasets cache built in ``tmp_path`` (what a first online run leaves there),
and the offline, not-cached failure runs for real with ``HF_HUB_OFFLINE=1`` and an empty HF_HOME.
"""
from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

import pipeline_sft_prep as prep
from helpers import ROOT, make_records, write_jsonl
from llama_sft.errors import EXIT_DATA, EXIT_IO, EXIT_OK, EXIT_USAGE
from llama_sft.files import verify_manifest
from llama_sft.prep.intake import Intake
from llama_sft.prep.options import config_from_args
from llama_sft.prep.report import RejectLog

OUTPUTS = ("sft_dataset.jsonl", "golden_set.jsonl")


@pytest.fixture
def tok(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def flat_records(n: int = 45) -> list[dict]:
    """Records whose every field is a string, so CSV holds them exactly as JSONL does."""
    return [{k: v for k, v in r.items() if k != "metadata"} for r in make_records(n)]


def run(tok: str, inputs: list, out: Path, *extra: str) -> int:
    return prep.main(["--enriched", *map(str, inputs), "--output-dir", str(out),
                      "--tokenizer", tok, "--golden-size", "6", *extra])


def record_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def read_phase(cfg) -> tuple[Intake, list[dict]]:
    """Only the streaming phase (no tokenizer), in this process; returns (Intake, rejects)."""
    buf = io.StringIO()
    intake = Intake(replace(cfg, workers=0), RejectLog(buf), progress=False)
    intake.read()
    return intake, [json.loads(line) for line in buf.getvalue().splitlines()]


def parsed(*argv: str):
    return config_from_args(prep.build_parser().parse_args(["--enriched", *argv]))


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


# ---------------------------------------------------------------------------------------------
# the same records in every container give byte-identical record files

def test_same_records_as_jsonl_csv_parquet_and_arrow_give_identical_outputs(tmp_path, tok):
    records = flat_records()
    data = tmp_path / "data"
    write_jsonl(data / "rows.jsonl", records)
    write_csv(data / "rows.csv", records)
    Dataset.from_list(records).to_parquet(str(data / "rows.parquet"))
    (data / "rows.bin").write_bytes((data / "rows.parquet").read_bytes())   # found by magic bytes
    Dataset.from_list(records[:30]).to_parquet(str(data / "part-0.parquet"))
    Dataset.from_list(records[30:]).to_parquet(str(data / "part-1.parquet"))
    Dataset.from_list(records).save_to_disk(str(data / "saved"), num_shards=2)
    DatasetDict({"dev": Dataset.from_list(records[:5]), "main": Dataset.from_list(records)}) \
        .save_to_disk(str(data / "saved_dict"))

    assert run(tok, [data / "rows.jsonl"], tmp_path / "jsonl") == EXIT_OK
    expected = record_files(tmp_path / "jsonl")
    assert expected["golden_set.jsonl"] and expected["sft_dataset.jsonl"]
    cases = {"csv": ([data / "rows.csv"], ()),
             "parquet": ([data / "rows.parquet"], ()),
             "sniffed": ([data / "rows.bin"], ()),
             "glob": ([data / "part-*.parquet"], ()),
             "arrow": ([data / "saved"], ()),
             "arrow_in_workers": ([data / "saved"], ("--workers", "2")),
             "arrow_dict": ([data / "saved_dict"], ("--hf-split", "main"))}
    for name, (inputs, extra) in cases.items():
        out = tmp_path / name
        assert run(tok, inputs, out, *extra) == EXIT_OK, name
        assert record_files(out) == expected, name

    # what was read is on record: the two parquet files of the glob, the Arrow shards
    inputs = {name: json.loads((tmp_path / name / "prep_report.json").read_text())["inputs"]
              for name in ("glob", "arrow", "sniffed")}
    assert [(Path(i["path"]).name, i["format"], i["records"]) for i in inputs["glob"]] == \
        [("part-0.parquet", "parquet", 30), ("part-1.parquet", "parquet", 15)]
    assert [(Path(i["path"]).name, i["format"]) for i in inputs["arrow"]] == \
        [("data-00000-of-00002.arrow", "arrow"), ("data-00001-of-00002.arrow", "arrow")]
    assert inputs["sniffed"][0]["format"] == "parquet"
    manifest = verify_manifest(tmp_path / "arrow_dict")
    assert [Path(p).parent.name for p in manifest["config"]["enriched"]] == ["main"]
    assert manifest["config"]["hf_split"] == "main"


def test_nested_values_read_from_parquet_and_arrow_as_from_jsonl(tmp_path, tok):
    """Lists of structs, lists of numbers, ints and nulls reach metadata as JSON holds them."""
    records = [dict(r, tags=[{"name": "t", "weight": 0.5 + i}], scores=[1.0, 2.25], rank=i,
                    note=None)
               for i, r in enumerate(flat_records(30))]
    write_jsonl(tmp_path / "rows.jsonl", records)
    Dataset.from_list(records).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert run(tok, [tmp_path / "rows.jsonl"], tmp_path / "jsonl") == EXIT_OK
    expected = record_files(tmp_path / "jsonl")
    for name, source in (("parquet", tmp_path / "rows.parquet"), ("arrow", tmp_path / "saved")):
        assert run(tok, [source], tmp_path / name) == EXIT_OK
        assert record_files(tmp_path / name) == expected, name
    first = json.loads(expected["sft_dataset.jsonl"].splitlines()[0])
    assert first["metadata"]["tags"][0]["name"] == "t" and first["metadata"]["note"] is None


def test_values_json_cannot_hold_are_converted_or_rejected_by_row(tmp_path):
    rows = pa.table({
        "instruction": ["Say hi.", "Say bye."], "response": ["hi", "bye"],
        "when": pa.array([datetime.datetime(2024, 5, 1, 12, 30)] * 2, pa.timestamp("us")),
        "day": [datetime.date(2024, 5, 1)] * 2,
        "price": pa.array([decimal.Decimal("1.25")] * 2, pa.decimal128(5, 2)),
        "took": pa.array([datetime.timedelta(seconds=90)] * 2, pa.duration("s")),
        "blob": [b"text", b"\xff\xfe"]})
    path = tmp_path / "typed.parquet"
    pq.write_table(rows, path)
    intake, rejects = read_phase(parsed(str(path)))
    assert [k.record["metadata"] for k in intake.kept] == [
        {"when": "2024-05-01T12:30:00", "day": "2024-05-01", "price": 1.25, "took": 90.0,
         "blob": "text"}]
    assert [(r["file"], r["index"], r["reason"]) for r in rejects] == \
        [(str(path), 1, "wrong_type")]
    assert "'blob' holds binary data that is not UTF-8 text" in rejects[0]["detail"]


# ---------------------------------------------------------------------------------------------
# hub datasets

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A datasets cache holding ``org/name`` (splits main and dev), as an online run leaves it;
    offline mode on, so nothing but the cache can be read."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    files = {}
    for split, records in (("main", flat_records()), ("dev", flat_records(4))):
        files[split] = str(tmp_path / f"hub-{split}.parquet")
        Dataset.from_list(records).to_parquet(files[split])
    Parquet(dataset_name="name", data_files=files, cache_dir=str(tmp_path / "scratch")) \
        .download_and_prepare(output_dir=str(cache / "org___name" / "default" / "0.0.0" / "h"))
    return cache


def test_hub_split_streams_from_the_cache_like_the_jsonl(tmp_path, hub_cache):
    cfg = parsed("hf://datasets/org/name", "--hf-split", "main")
    assert cfg.enriched == ("hf://datasets/org/name?split=main",)
    hub, hub_rejects = read_phase(cfg)
    local, _ = read_phase(parsed(str(write_jsonl(tmp_path / "rows.jsonl", flat_records()))))
    assert [k.record for k in hub.kept] == [k.record for k in local.kept]
    assert hub.inputs == [{"path": cfg.enriched[0], "format": "hub", "records": 45,
                           "blank_lines": 0}]
    assert {r["file"] for r in hub_rejects} <= {cfg.enriched[0]}
    assert {k.file for k in hub.kept} == {cfg.enriched[0]}
    assert [k.loc for k in hub.kept[:2]] == [{"index": 0}, {"index": 1}]
    dev = parsed("hf://datasets/org/name?split=dev&config=default")
    assert dev.enriched == ("hf://datasets/org/name?split=dev&config=default",)
    assert len(read_phase(dev)[0].kept) == 4


@pytest.mark.parametrize("argv, fragment", [
    (("--hf-split", "test"), "check --hf-split / --hf-config"),
    (("--hf-config", "other"), "Couldn't find cache for org/name for config 'other'"),
])
def test_unknown_hub_split_or_config_exit_2(tmp_path, tok, hub_cache, capsys, argv, fragment):
    out = tmp_path / "out"
    assert run(tok, ["hf://datasets/org/name"], out, *argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("hub_id", ["hf://datasets/org", "hf://models/org/name",
                                    "hf://datasets/org/na--me", "hf://datasets/org/name/x",
                                    "hf://datasets/org/name?revision=main", "hf:org/name"])
def test_malformed_hub_id_exit_2(tmp_path, tok, capsys, hub_id):
    out = tmp_path / "out"
    assert run(tok, [hub_id], out) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: malformed hub dataset id") and len(err.splitlines()) == 1
    assert "hf://datasets/ORG/NAME" in err
    assert_nothing_written(tmp_path, out)


def test_offline_hub_id_not_cached_exit_74_naming_the_cache(tmp_path):
    home, out = tmp_path / "empty_hf_home", tmp_path / "out"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline_sft_prep.py"), "--enriched",
                           "hf://datasets/org/name", "--output-dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_IO, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "HF_HUB_OFFLINE" in err and str(home / "datasets") in err
    assert_nothing_written(tmp_path, out)


# ---------------------------------------------------------------------------------------------
# bad inputs: the right exit code, nothing written

def test_bad_container_inputs_exit_with_their_code_and_write_nothing(tmp_path, tok, capsys):
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "plain_dir" / "a.parquet").write_bytes(b"")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    DatasetDict({"train": Dataset.from_list(flat_records(3))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    cases = [([tmp_path / "nothing-*.parquet"], (), EXIT_USAGE, "no input matches"),
             ([tmp_path / "plain_dir"], (), EXIT_USAGE, "not one written by Dataset.save_to_disk"),
             ([tmp_path / "saved_dict"], ("--hf-split", "dev"), EXIT_USAGE,
              "has no split 'dev' (its splits: train)"),
             ([tmp_path / "broken.parquet"], (), EXIT_DATA, "cannot read it as parquet")]
    capsys.readouterr()                                   # the progress bars of the set-up
    for inputs, extra, code, fragment in cases:
        out = tmp_path / "out"
        assert run(tok, inputs, out, *extra) == code, fragment
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
        assert_nothing_written(tmp_path, out)
