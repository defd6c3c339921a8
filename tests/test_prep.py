"""The prep stage: readers, reject reasons, cleaning, PII, dedup, splits, golden set,
contamination guard, outputs, determinism, exit codes and atomicity.

Runs on the tiny model's tokenizer (the embedded SmolLM2 tokenizer) and tens of records.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ROOT

sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_demo_data as demo  # noqa: E402
import pipeline_sft_prep as prep  # noqa: E402
from llama_sft.config.presets import get_preset
from llama_sft.config.settings import FIELD_SECTION, resolve_config
from llama_sft.errors import EXIT_DATA, EXIT_OK, EXIT_USAGE
from llama_sft.files import describe_inputs, verify_manifest
from llama_sft.prep.contamination import SharedGrams, _most_shared_eval
from llama_sft.prep.intake import Intake
from llama_sft.prep.minhash import (NUM_PERM, MinHashBands, MinHasher, SignatureStore, best_match,
                                    shingle_hash, shingles)
from llama_sft.prep.normalize import clean_text
from llama_sft.prep.options import OUTPUT_FILES, PrepConfig, parse_field_map
from llama_sft.prep.pii import may_hold_pii, scrub_pii
from llama_sft.prep.report import RejectLog
from llama_sft.prep.splits import assign_splits
from llama_sft.prep.training_config import derive_training_config
from llama_sft.prep.workers import gc_paused

SCHEMA_KEYS = ["id", "split", "category", "instruction", "context", "response", "metadata"]


# ---------------------------------------------------------------------------------------------
# helpers

def base_records(n: int = 40, seed: int = 5) -> list[dict]:
    """Distinct, clean enriched records (the demo generator, no dirt)."""
    return list(demo.clean_records(n, seed))


def write_lines(path: Path, lines: list) -> Path:
    """Write dicts as JSON lines, str/bytes as they are (bytes may be invalid UTF-8)."""
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out += (line.encode("utf-8") if isinstance(line, str) else line) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def read_phase(tmp_path: Path, lines: list, name: str = "in.jsonl", **options):
    """Run only the streaming phase (no tokenizer); returns (Intake, rejects)."""
    path = write_lines(tmp_path / name, lines) if lines is not None else tmp_path / name
    buf = io.StringIO()
    run = Intake(PrepConfig(enriched=(str(path),), **options), RejectLog(buf), progress=False)
    run.read()
    return run, [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.fixture
def tok(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def cli(tok: str, inputs, out: Path, *extra: str) -> int:
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return prep.main(["--enriched", *map(str, inputs), "--output-dir", str(out),
                      "--tokenizer", tok, "--golden-size", "6", *extra])


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(out: Path) -> dict:
    return {"dataset": load_jsonl(out / "sft_dataset.jsonl"),
            "golden": load_jsonl(out / "golden_set.jsonl"),
            "rejects": load_jsonl(out / "rejects.jsonl"),
            "report": json.loads((out / "prep_report.json").read_text()),
            "training": json.loads((out / "training_config.json").read_text())}


# ---------------------------------------------------------------------------------------------
# command line

def test_help_is_instant_and_shows_defaults():
    """No heavy import for --help (torch, transformers, datasets, pyarrow), every default shown,
    the hub flags and the container formats included."""
    code = ("import sys, pipeline_sft_prep as p; h = p.build_parser().format_help(); "
            "print(sorted({'torch', 'transformers', 'datasets', 'pyarrow'} & set(sys.modules))); "
            "print(h)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[0] == "[]"
    assert "(default: 150)" in out and "(default: drop)" in out and "(default: 0.1)" in out
    help_text = " ".join(out.split())
    assert "--hf-split HF_SPLIT split to read from a hub dataset" in help_text
    assert "(default: train)" in help_text and "(default: 0.05)" in help_text
    assert "{auto,jsonl,json,csv,tsv,parquet,arrow}" in help_text
    with pytest.raises(SystemExit) as exc:
        prep.main(["--help"])
    assert exc.value.code == 0


def test_argparse_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        prep.main(["--output-dir", str(tmp_path / "o")])          # --enriched missing
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        prep.main(["--enriched", "x.jsonl", "--length-policy", "chop"])
    assert exc.value.code == EXIT_USAGE


def test_option_problems_are_reported_together(tmp_path, tok, capsys):
    path = write_lines(tmp_path / "in.jsonl", base_records(5))
    rc = cli(tok, path, tmp_path / "out", "--val-fraction", "0.7", "--dedup-threshold", "1.5",
             "--field-map", "answer=response", "--model-size", "9b")
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE
    assert len(err.splitlines()) == 1
    for fragment in ("--val-fraction", "--dedup-threshold", "--field-map: unknown key(s) answer",
                     "unknown --model-size '9b'"):
        assert fragment in err
    assert not (tmp_path / "out").exists()


def test_missing_input_and_foreign_output_dir_exit_2(tmp_path, tok, capsys):
    assert cli(tok, tmp_path / "nope.jsonl", tmp_path / "out") == EXIT_USAGE
    assert "input file not found" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    path = write_lines(tmp_path / "in.jsonl", base_records(5))
    assert cli(tok, path, foreign) == EXIT_USAGE
    assert "was not written by the prep stage" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    inside = write_lines(foreign / "data.jsonl", base_records(5))
    assert cli(tok, inside, foreign) == EXIT_USAGE
    assert "contains the input" in capsys.readouterr().err


def test_bad_field_map_entry_exit_2(tmp_path, tok, capsys):
    path = write_lines(tmp_path / "in.jsonl", base_records(5))
    assert cli(tok, path, tmp_path / "out", "--field-map", "instruction") == EXIT_USAGE
    assert "is not KEY=FIELD" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# every reject reason, with file and line

GOOD_A = {"id": "a", "instruction": "Name the capital of Norway.", "response": "Oslo"}
GOOD_B = {"id": "b", "instruction": "Spell the word cat backwards.", "response": "tac"}

REJECT_CASES = [
    ('{"instruction": "Say hi", "response": "hi', "truncated_line", "the JSON is cut off"),
    ("<html><body>502 Bad Gateway</body></html>", "invalid_json", "not valid JSON"),
    ('["a", "list"]', "not_an_object", "the line holds an array"),
    ('"just a string"', "not_an_object", "the line holds a string"),
    ({"question": "q", "answer": "a"}, "unknown_shape", "no known record shape"),
    ({"instruction": "Say hi"}, "missing_field", "field 'response' is missing"),
    ({"response": "hi"}, "missing_field", "field 'instruction' is missing"),
    ({"instruction": "Say hi", "response": None}, "null_field", "field 'response' is null"),
    ({"instruction": None, "response": "hi"}, "null_field", "field 'instruction' is null"),
    ({"instruction": "Say hi", "response": 42}, "wrong_type", "'response' is a number"),
    ({"instruction": "Say hi", "response": ["hi"]}, "wrong_type", "'response' is an array"),
    ({"instruction": "Say hi", "context": {"a": 1}, "response": "hi"}, "wrong_type",
     "'context' is an object"),
    ({"instruction": "Say hi", "response": "hi", "category": 3}, "wrong_type",
     "'category' is a number"),
    ({"instruction": "Say hi", "response": "hi", "id": [1]}, "wrong_type", "'id' is an array"),
    ({"instruction": "Say hi", "response": " \n\t\u200b "}, "empty_response", "response is empty"),
    ({"instruction": "\u00a0\x07", "response": "hi"}, "empty_instruction", "instruction is empty"),
    ({"messages": "hello"}, "wrong_type", "'messages' is a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "bad_chat", "one user turn then one assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
     "wrong_type", "message 1 content is null"),
    ({"id": "a", "instruction": "Something else entirely", "response": "new"}, "duplicate_id",
     "id 'a' was already used at"),
]


@pytest.mark.parametrize("line,reason,detail", REJECT_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(REJECT_CASES)])
def test_each_reject_reason_names_file_and_line(tmp_path, line, reason, detail):
    run, rejects = read_phase(tmp_path, [GOOD_A, line, GOOD_B])
    assert [k.record["id"] for k in run.kept] == ["a", "b"]
    assert len(rejects) == 1
    rej = rejects[0]
    assert (rej["file"], rej["line"], rej["reason"]) == (str(tmp_path / "in.jsonl"), 2, reason)
    assert detail in rej["detail"]
    assert run.rejects.counts == {reason: 1}
    assert run.stats["records"] == 3


def test_non_utf8_line_names_line_and_byte_offset(tmp_path):
    bad = json.dumps({"instruction": "Translate", "response": "café"},
                     ensure_ascii=False).encode("utf-8")
    bad = bad.replace("é".encode("utf-8"), b"\xe9")                     # latin-1 byte
    good = json.dumps(GOOD_A).encode("utf-8")
    run, rejects = read_phase(tmp_path, [good, bad, GOOD_B])
    in_line = bad.index(b"\xe9")
    offset = len(good) + 1 + in_line
    assert rejects == [{"file": str(tmp_path / "in.jsonl"), "line": 2, "reason": "not_utf8",
                        "detail": f"invalid UTF-8 at byte offset {offset} (line 2, byte "
                                  f"{in_line} of the line): invalid continuation byte",
                        "byte_offset": offset,
                        "excerpt": bad.decode("utf-8", "replace")}]
    assert len(run.kept) == 2


def test_low_quality_filter_and_quality_accounting(tmp_path):
    lines = [dict(GOOD_A, quality_score=0.9), dict(GOOD_B, quality_score=0.2),
             {"id": "c", "instruction": "Count to three.", "response": "1, 2, 3"},
             {"id": "d", "instruction": "Say yes.", "response": "yes", "quality": "high"}]
    run, rejects = read_phase(tmp_path, lines, min_quality=0.5)
    assert [k.record["id"] for k in run.kept] == ["a", "c", "d"]
    assert [(r["line"], r["reason"], r["id"]) for r in rejects] == [(2, "low_quality", "b")]
    assert run.quality == {"present": 2, "missing": 1, "unparseable": 1}
    assert run.kept[0].quality == 0.9 and run.kept[1].quality is None


def test_blank_lines_are_counted_not_rejected(tmp_path):
    run, rejects = read_phase(tmp_path, [GOOD_A, "", "   ", GOOD_B])
    assert rejects == [] and run.stats["blank_lines"] == 2 and run.stats["records"] == 2


# ---------------------------------------------------------------------------------------------
# formats and shapes

def test_shapes_are_detected_and_extra_fields_kept_as_metadata(tmp_path):
    lines = [
        {"id": "ir", "category": "qa", "instruction": "Q1?", "context": "ctx", "response": "A1",
         "source": "s", "quality_score": 0.7, "tags": ["x"]},
        {"id": "al", "instruction": "Q2?", "input": "inp", "output": "A2", "source": "alp"},
        {"id": "pc", "prompt": "Q3?", "completion": "A3"},
        {"id": "ch", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Q4?"},
                                  {"role": "assistant", "content": "A4"}], "created_at": "t"},
    ]
    run, rejects = read_phase(tmp_path, lines)
    assert rejects == []
    got = {k.record["id"]: k.record for k in run.kept}
    assert got["ir"] == {"id": "ir", "split": None, "category": "qa", "instruction": "Q1?",
                         "context": "ctx", "response": "A1",
                         "metadata": {"source": "s", "quality_score": 0.7, "tags": ["x"]}}
    assert (got["al"]["context"], got["al"]["response"], got["al"]["metadata"]) == \
        ("inp", "A2", {"source": "alp"})
    assert (got["pc"]["instruction"], got["pc"]["response"], got["pc"]["category"]) == \
        ("Q3?", "A3", "general")
    assert got["ch"]["instruction"] == "Q4?" and got["ch"]["response"] == "A4"
    assert got["ch"]["metadata"] == {"created_at": "t", "system_prompt": "Be brief."}
    assert run.shapes == {"instruction_response": 1, "alpaca": 1, "prompt_completion": 1,
                          "chat": 1}


def test_field_map_overrides_detection(tmp_path):
    lines = [{"uid": 7, "task": "trivia", "question": "Largest planet?", "passage": "p",
              "answer": "Jupiter", "rating": "0.4"}]
    run, rejects = read_phase(tmp_path, lines, field_map={
        "instruction": "question", "context": "passage", "response": "answer", "id": "uid",
        "category": "task", "quality": "rating"}, min_quality=0.5)
    assert [r["reason"] for r in rejects] == ["low_quality"]
    run, rejects = read_phase(tmp_path, lines, field_map=parse_field_map(
        ["instruction=question,context=passage", "response=answer", "id=uid", "category=task"]))
    rec = run.kept[0].record
    assert (rec["id"], rec["category"], rec["instruction"], rec["context"], rec["response"]) == \
        ("7", "trivia", "Largest planet?", "p", "Jupiter")
    assert rec["metadata"] == {"rating": "0.4"}


def test_json_array_csv_and_gzip_inputs(tmp_path):
    recs = base_records(6)
    (tmp_path / "arr.json").write_text(json.dumps(recs[:3] + [5]), encoding="utf-8")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in recs[3:5]) + "\n")
    with open(tmp_path / "rows.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["id", "category", "instruction", "context", "response",
                                     "quality_score"], extrasaction="ignore")
        writer.writeheader()
        writer.writerow(dict(recs[5], context="line one\nline two"))   # a quoted 2-line cell
        writer.writerow({"id": "short"})
    raw = (tmp_path / "rows.csv").read_bytes() + b"latin,x,Say caf\xe9,,hi,0.5\r\nonly,two\r\n"
    (tmp_path / "rows.csv").write_bytes(raw)
    buf = io.StringIO()
    cfg = PrepConfig(enriched=(str(tmp_path / "arr.json"), str(tmp_path / "more.jsonl.gz"),
                                    str(tmp_path / "rows.csv")))
    run = Intake(cfg, RejectLog(buf), progress=False)
    run.read()
    rejects = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [k.record["id"] for k in run.kept] == [r["id"] for r in recs]
    assert run.kept[5].quality == recs[5]["quality_score"]
    assert run.kept[5].record["context"] == "line one\nline two"
    assert [i["format"] for i in run.inputs] == ["json", "jsonl", "csv"]
    where = [(Path(r["file"]).name, r.get("line", r.get("index")), r["reason"]) for r in rejects]
    assert where == [("arr.json", 3, "not_an_object"), ("rows.csv", 4, "empty_instruction"),
                     ("rows.csv", 5, "not_utf8"), ("rows.csv", 6, "invalid_csv")]
    offset = raw.index(b"\xe9")
    assert rejects[2]["byte_offset"] == offset and f"byte offset {offset}" in rejects[2]["detail"]
    assert rejects[0]["index"] == 3 and "line" not in rejects[0]


def test_json_file_with_wrong_top_level_type(tmp_path):
    (tmp_path / "obj.json").write_text('{"data": []}')
    run, rejects = read_phase(tmp_path, None, name="obj.json")
    assert [r["reason"] for r in rejects] == ["wrong_top_level_type"]
    assert "expected an array of record objects" in rejects[0]["detail"]


# ---------------------------------------------------------------------------------------------
# cleaning, PII, dedup

def test_clean_text_normalizes_and_keeps_indentation():
    text, changed = clean_text("  Cafe\u0301\u00a0bar\u200b\x07\r\n  def f():\n"
                                    "      return 1   \n\n\n\nend\t ")
    assert text == "Café bar\n  def f():\n      return 1\n\nend"
    assert changed == {"unicode_normalized", "control_chars_removed", "whitespace_fixed"}
    assert clean_text("plain text") == ("plain text", set())


@pytest.mark.parametrize("text,expected,kinds", [
    ("mail ada.lovelace@example.co.uk now", "mail [EMAIL] now", {"email": 1}),
    ("call +44 20 7946 0958 or (415) 555-0134.", "call [PHONE] or [PHONE].", {"phone": 2}),
    ("US 415-555-0134 and 415.555.0134", "US [PHONE] and [PHONE]", {"phone": 2}),
    ("key sk-proj-ABCDEFGHIJKLMNOPQRSTuvwx1234", "key [API_KEY]", {"api_key": 1}),
    ("hf_abcdefghijklmnopqrstuvwxyzABCDEF12 and AKIAABCDEFGHIJKLMNOP",
     "[API_KEY] and [API_KEY]", {"api_key": 2}),
    ("ghp_" + "a1" * 18 + " xoxb-1234567890-abcdef", "[API_KEY] [API_KEY]", {"api_key": 2}),
    ("Authorization: Bearer abc.def-ghi_jkl~mno+pqr/stu=", "Authorization: Bearer [API_KEY]",
     {"api_key": 1}),
    ("password=hunter2hunter2, api_key: 9f8e7d6c5b4a", "password=[API_KEY], api_key: [API_KEY]",
     {"api_key": 2}),
    ("on 2021-03-05, 05.03.2021, v4.12.3, 192.168.1.10, order #48213, 76,298 people, 12.50 EUR",
     "on 2021-03-05, 05.03.2021, v4.12.3, 192.168.1.10, order #48213, 76,298 people, 12.50 EUR",
     {}),
])
def test_scrub_pii(text, expected, kinds):
    out, counts = scrub_pii(text)
    assert out == expected and dict(counts) == kinds


# fragments that make PII patterns match, almost match, or meet at a text's edge
_PII_PIECES = ["bob@corp.example", "@", ".org", "020 7946 0958", "555-0134", "(415) ", "+44 ",
               "Bearer ", "abcdefghijklmnopqrstuv", "password=", "token: ", "hf_", "sk-", "x",
               " ", "-", ".", "7", "\n", "é"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PII_PIECES), max_size=8).map("".join), max_size=5))
def test_may_hold_pii_is_false_only_when_scrubbing_changes_nothing(texts):
    changed = any(scrub_pii(t)[0] != t for t in texts)
    assert may_hold_pii(texts) or not changed


def test_gc_paused_restores_the_collector_state():
    import gc

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()                 # the inner pause does not end the outer one
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed phase")
    assert gc.isenabled()


def test_may_hold_pii_on_known_cases():
    assert may_hold_pii(["plain", "mail bob@corp.example"])
    assert may_hold_pii(["020 7946 0958"])               # a whole text is a number
    assert not may_hold_pii(["on 2021-03-05, v4.12.3", "order #48213", ""])


def test_pii_is_scrubbed_everywhere_and_counted(tmp_path):
    lines = [{"id": "p", "instruction": "Route: write to bob@corp.example", "response": "billing",
              "context": "Call 020 7946 0958", "metadata_email": "x@y.org"}, GOOD_B]
    run, rejects = read_phase(tmp_path, lines)
    rec = run.kept[0].record
    assert rec["instruction"] == "Route: write to [EMAIL]" and rec["context"] == "Call [PHONE]"
    assert rec["metadata"] == {"metadata_email": "[EMAIL]"}
    assert run.pii == {"email": 2, "phone": 1, "records": 1}
    run, _ = read_phase(tmp_path, lines, pii_scrub=False)
    assert run.kept[0].record["context"] == "Call 020 7946 0958" and not run.pii


@pytest.mark.parametrize("text", ["", "ab", "hello", "hello world, this is text",
                                  "naïve café — ünïcode text " * 7])
def test_minhasher_matches_datasketch_minhash(text):
    from datasketch import MinHash

    reference = MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32",
                        hashfunc=shingle_hash)
    reference.update_batch(shingles(text))
    signature = MinHasher()(text)
    assert signature.dtype == reference.hashvalues.dtype
    assert (signature == reference.hashvalues).all()


def test_minhash_bands_find_what_datasketch_lsh_finds():
    from datasketch import LeanMinHash, MinHashLSH

    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta"]
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(30)]
    texts = base + [t[:-rng.randint(1, 30)] + " extra" for t in base]     # near copies
    minhash = MinHasher()
    signatures = [minhash(t) for t in texts]
    ours = MinHashBands(0.8)
    theirs = MinHashLSH(threshold=0.8, num_perm=NUM_PERM)
    for key, sig in enumerate(signatures):
        ours.insert(key, sig)
        theirs.insert(key, LeanMinHash(seed=1, hashvalues=sig, scheme="affine32"))
    found = 0
    for sig in signatures:
        expected = sorted(theirs.query(LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")))
        assert ours.query(sig) == expected
        found += len(expected) > 1
    assert found >= 30                      # the near copies did collide


def test_best_match_prefers_the_highest_accepted_score():
    store = SignatureStore(num_perm=10)
    sig = np.arange(10, dtype=np.uint32)
    for changed in (2, 0, 1):               # rows 0, 1, 2 agree on 0.8, 1.0, 0.9 of the values
        row = sig.copy()
        row[:changed] = 99
        store.append(row)
    assert best_match(sig, [0, 1, 2], store, 0.85) == (1, 1.0)
    assert best_match(sig, [0, 1, 2], store, 0.85, accept=lambda k: k != 1) == (2, 0.9)
    assert best_match(sig, [0, 1, 2], store, 0.85, accept=lambda k: k == 0) is None
    assert best_match(sig, [], store, 0.5) is None


def test_best_match_prefilter_changes_no_result():
    rng = np.random.default_rng(0)
    store = SignatureStore()
    base = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint32)
    for _ in range(400):                    # agreement with base from 0 to 100%
        row = base.copy()
        changed = rng.random(NUM_PERM) < rng.random()
        row[changed] = rng.integers(0, 2**32, changed.sum(), dtype=np.uint32)
        store.append(row)
    full = (store[np.arange(400)] == base).mean(axis=1)
    for threshold in (0.5, 0.75, 0.9):
        for accept in (None, lambda k: k % 3 == 0):
            ok = [k for k in range(400) if full[k] >= threshold and (accept is None or accept(k))]
            want = max(ok, key=lambda k: (full[k], -k)) if ok else None
            got = best_match(base, list(range(400)), store, threshold, accept)
            assert (got and got[0]) == want and (got is None or got[1] == full[want])
    # the bound is tight: a row whose 12 disagreements all sit in the compared half still passes
    tight = base.copy()
    tight[:12] += 1
    row = store.append(tight)
    below = [k for k in range(400) if full[k] < 0.9]
    assert best_match(base, below + [row], store, 0.9) == (row, 116 / 128)


def test_signature_store_grows_and_keeps_rows():
    store = SignatureStore(num_perm=4)
    rows = [np.full(4, i, dtype=np.uint32) for i in range(2500)]     # past two doublings
    assert [store.append(r) for r in rows] == list(range(2500))
    assert (store[[0, 1024, 2499]] == np.array([[0] * 4, [1024] * 4, [2499] * 4])).all()


def test_worker_processes_write_the_same_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"out-{workers}"
        assert prep.main(["--enriched", "data/demo_enriched.jsonl", "--output-dir", str(out),
                          "--workers", str(workers)]) == 0
        outs.append(out)
    for name in OUTPUT_FILES:
        if name != "manifest.json":
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_exact_and_near_duplicates_are_removed_and_counted(tmp_path):
    recs = base_records(8)
    src = next(r for r in recs if r["category"] == "classification")
    exact = {"id": "dup-chat", "category": src["category"], "messages": [
        {"role": "user", "content": f"{src['instruction']}\n\n  {src['context']}"},
        {"role": "assistant", "content": src["response"] + "  "}]}   # other shape, same text
    near = dict(src, id="dup-near", context=src["context"].upper().replace(",", ""))
    other_answer = dict(src, id="same-prompt-other-answer", response="not " + src["response"])
    run, rejects = read_phase(tmp_path, recs + [exact, near, other_answer])
    assert [(r["id"], r["reason"], r.get("duplicate_of")) for r in rejects] == [
        ("dup-chat", "duplicate", src["id"]), ("dup-near", "near_duplicate", src["id"])]
    assert "same answer" in rejects[1]["detail"]
    assert [k.record["id"] for k in run.kept] == [r["id"] for r in recs] + [other_answer["id"]]


# ---------------------------------------------------------------------------------------------
# splits, golden set, training config

def test_assign_splits_is_seeded_stratified_and_prefers_quality():
    items = [(cat, q / 100, q % 17 == 0) for cat, n in (("a", 300), ("b", 100), ("c", 50))
             for q in range(n)]
    splits, info = assign_splits(items, seed=1, val_fraction=0.1, test_fraction=0.1,
                                      golden_size=45)
    again, _ = assign_splits(items, seed=1, val_fraction=0.1, test_fraction=0.1,
                                  golden_size=45)
    other, _ = assign_splits(items, seed=2, val_fraction=0.1, test_fraction=0.1,
                                  golden_size=45)
    assert splits == again and splits != other
    count = Counter((items[i][0], s) for i, s in enumerate(splits))
    assert {c: count[(c, "golden")] for c in "abc"} == {"a": 30, "b": 10, "c": 5}
    assert {c: count[(c, "val")] for c in "abc"} == {"a": 30, "b": 10, "c": 5}
    assert {c: count[(c, "test")] for c in "abc"} == {"a": 30, "b": 10, "c": 5}
    golden = [items[i] for i, s in enumerate(splits) if s == "golden"]
    assert all(not truncated for _, _, truncated in golden)
    a_golden_q = sorted(q for c, q, _ in golden if c == "a")
    a_all_q = sorted((q for c, q, t in items if c == "a" and not t), reverse=True)
    assert a_golden_q == sorted(a_all_q[:30])                 # the 30 best-scored, not random
    assert info == {"golden_requested": 45, "golden_target": 45, "golden_capped": False,
                    "golden_per_category": {"a": 30, "b": 10, "c": 5}}


def test_golden_set_is_capped_at_a_fifth():
    items = [("x", None, False)] * 20
    splits, info = assign_splits(items, seed=0, val_fraction=0.05, test_fraction=0.05,
                                      golden_size=150)
    assert Counter(splits) == {"golden": 4, "val": 1, "test": 1, "train": 14}
    assert info["golden_capped"] and info["golden_target"] == 4


def test_derive_training_config():
    values, how = derive_training_config(100, [70, 130, 90], get_preset("135m"), 512)
    # 135m: batch 4 x accumulation 1, the preset's max_steps 60 -> 5 evaluations of 12 steps
    assert values == {"eval_steps": 12, "max_length": 192, "save_steps": 12, "warmup_steps": 3}
    assert (how["steps_per_epoch"], how["total_steps"], how["examples_per_step"]) == (25, 60, 4)
    values, how = derive_training_config(1000, [3000], get_preset("7b"), 2048)
    # 7b: batch 4 x accumulation 4 -> 63 steps/epoch x 3 epochs = 189 steps
    assert values == {"eval_steps": 38, "max_length": 2048, "save_steps": 38, "warmup_steps": 10}
    assert how["total_steps"] == 189
    assert set(values) <= set(FIELD_SECTION)


# ---------------------------------------------------------------------------------------------
# end to end

def dirty_lines() -> tuple[list, dict]:
    """40 clean records plus one of each kind of dirt; returns (lines, {line: reason})."""
    recs = base_records(40)
    cls = [r for r in recs if r["category"] == "classification"]
    cut = '{"id": "cut", "instruction": "Say'
    latin = json.dumps(dict(recs[2], id="latin", context="é"), ensure_ascii=False).encode("latin-1")
    lines: list = list(recs)
    lines.insert(12, dict(recs[0], id="overlong", context="word " * 700))
    lines.insert(15, dict(recs[1], id="empty", response="   "))
    lines.insert(18, cut)
    lines.insert(20, latin)
    lines.insert(22, "")
    lines.insert(25, {"id": "pii", "category": "classification", "instruction": "Route it.",
                      "context": "I was billed twice. Mail me: a.b@c.org", "response": "billing"})
    lines.append(dict(cls[0], id="exact-dup", source="reingest"))
    lines.append(dict(cls[1], id="near-dup", context=cls[1]["context"].lower() + " !!"))
    line_no = {(x["id"] if isinstance(x, dict) else x): i + 1 for i, x in enumerate(lines)}
    expected = {line_no["exact-dup"]: "duplicate", line_no["near-dup"]: "near_duplicate",
                line_no["overlong"]: "too_long", line_no["empty"]: "empty_response",
                line_no[cut]: "truncated_line", line_no[latin]: "not_utf8"}
    return lines, expected


def test_end_to_end_files_numbers_and_contracts(tmp_path, tok, capsys):
    lines, expected = dirty_lines()
    path = write_lines(tmp_path / "enriched.jsonl", lines)
    out = tmp_path / "sft_output"
    assert cli(tok, path, out) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left
    o = outputs(out)
    report = o["report"]
    assert report["rejects_by_reason"] == dict(sorted(Counter(expected.values()).items()))
    assert report["counts"] == {"records_read": 47, "blank_lines": 1, "kept": 41, "rejected": 6,
                                "invalid": 3, "invalid_fraction": round(3 / 47, 4),
                                "max_reject_fraction": 0.1}
    assert report["splits"] == {"train": 31, "val": 2, "test": 2, "golden": 6}
    assert report["pii"] == {"enabled": True, "email": 1, "phone": 0, "api_key": 0, "records": 1}
    assert report["dedup"]["exact"] == 1 and report["dedup"]["near"] == 1
    assert report["contamination"]["removed_from_train"] == 0
    assert report["length"]["dropped"] == 1 and report["length"]["policy"] == "drop"
    assert sum(c["total"] for c in report["categories"].values()) == 41
    # rejects: every one with its file, line and reason
    assert {r["line"]: r["reason"] for r in o["rejects"]} == expected
    assert all(r["file"] == str(path) for r in o["rejects"])
    cls = [r for r in base_records(40) if r["category"] == "classification"]
    assert {r["id"]: r["duplicate_of"] for r in o["rejects"] if "duplicate_of" in r} == \
        {"exact-dup": cls[0]["id"], "near-dup": cls[1]["id"]}
    # the two record files: schema, splits, disjointness, PII
    assert all(list(r) == SCHEMA_KEYS for r in o["dataset"] + o["golden"])
    assert Counter(r["split"] for r in o["dataset"]) == {"train": 31, "val": 2, "test": 2}
    assert {r["split"] for r in o["golden"]} == {"golden"}
    ids = [r["id"] for r in o["dataset"] + o["golden"]]
    assert len(ids) == len(set(ids)) == 41
    pii = next(r for r in o["dataset"] + o["golden"] if r["id"] == "pii")
    assert pii["context"].endswith("Mail me: [EMAIL]")
    assert all(r["metadata"]["prep"]["num_tokens"] <= 512 for r in o["dataset"])
    # training config: RunConfig keys only, resolvable for any size
    assert o["training"] == report["training_config"]["values"]
    assert set(o["training"]) == {"eval_steps", "max_length", "save_steps", "warmup_steps"}
    longest = max(r["metadata"]["prep"]["num_tokens"] for r in o["dataset"] + o["golden"])
    assert o["training"]["max_length"] == -(-longest // 64) * 64
    cfg = resolve_config("7b", file_values=json.loads((out / "training_config.json").read_text()),
                         origin="training_config.json")
    assert cfg.data.max_length == o["training"]["max_length"]
    assert cfg.optim.learning_rate == get_preset("7b").learning_rate     # preset values untouched
    # manifest: stage, hashed inputs, the options
    manifest = verify_manifest(out)
    assert manifest["stage"] == "prep"
    assert set(manifest["files"]) == set(OUTPUT_FILES) - {"manifest.json"}
    assert manifest["inputs"]["enriched"]["sha256"] == describe_inputs(
        {"x": path})["x"]["sha256"]
    assert manifest["config"]["golden_size"] == 6 and manifest["config"]["seed"] == 42
    assert "kept 41 of 47 records" in capsys.readouterr().out


def test_same_input_same_seed_gives_byte_identical_outputs(tmp_path, tok):
    lines, _ = dirty_lines()
    path = write_lines(tmp_path / "enriched.jsonl", lines)
    out = tmp_path / "out"
    assert cli(tok, path, out) == EXIT_OK
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli(tok, path, out) == EXIT_OK
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first.keys() == second.keys()
    for name in first:
        if name != "manifest.json":
            assert first[name] == second[name], name
    m1, m2 = json.loads(first["manifest.json"]), json.loads(second["manifest.json"])
    m1.pop("created"), m2.pop("created")
    assert m1 == m2
    assert cli(tok, path, out, "--seed", "7") == EXIT_OK
    assert (out / "sft_dataset.jsonl").read_bytes() != first["sft_dataset.jsonl"]


def test_contamination_is_removed_from_train_and_reported(tmp_path, tok):
    import random

    rng = random.Random(0)
    lines = []
    for i in range(30):                        # every passage carries two different questions
        town = demo.make_town(rng)
        for aspect in ("mayor", "founded"):
            inst, ctx, resp = demo.make_qa(rng, town, aspect)
            lines.append({"id": f"q{i}-{aspect}", "category": "qa", "instruction": inst,
                          "context": ctx, "response": resp})
    path = write_lines(tmp_path / "qa.jsonl", lines)
    out = tmp_path / "out"
    assert cli(tok, path, out, "--test-fraction", "0.1") == EXIT_OK
    o = outputs(out)
    split_of = {r["id"]: r["split"] for r in o["dataset"] + o["golden"]}
    leaked = [r for r in o["rejects"] if r["reason"] == "contaminated"]
    eval_ids = {i for i, s in split_of.items() if s in ("golden", "test")}
    # every eval record whose twin was assigned to train had that twin removed
    assert {r["overlaps"] for r in leaked} <= eval_ids
    for rid in eval_ids:
        twin = rid.replace("mayor", "X").replace("founded", "mayor").replace("X", "founded")
        assert split_of.get(twin) != "train"
    c = o["report"]["contamination"]
    assert c["removed_from_train"] == len(leaked) >= 3
    assert c["near_duplicate"] + c["ngram_overlap"] == len(leaked)
    assert sum(c["by_eval_split"].values()) == len(leaked)
    assert o["report"]["splits"]["train"] == 60 - len(eval_ids) - len(leaked) \
        - o["report"]["splits"]["val"]


def _most_shared_reference(shared, postings, is_train, counted, min_count):
    """The per-record loop that _most_shared_eval replaces."""
    out = {}
    for i in range(len(shared)):
        if not is_train[i]:
            continue
        votes = Counter(j for g in shared[i] if counted[g] for j in postings[g])
        if votes:
            top = max(votes.values())
            j = min(j for j, c in votes.items() if c == top)
            if top >= min_count:
                out[i] = (j, top)
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_most_shared_eval_matches_a_per_record_loop(data):
    n_records = data.draw(st.integers(1, 12))
    n_grams = data.draw(st.integers(1, 10))
    postings = [sorted(data.draw(st.sets(st.integers(0, n_records - 1), min_size=1)))
                for _ in range(n_grams)]
    shared = [sorted(data.draw(st.sets(st.integers(0, n_grams - 1)))) for _ in range(n_records)]
    is_train = np.array(data.draw(st.lists(st.booleans(), min_size=n_records,
                                           max_size=n_records)))
    counted = np.array(data.draw(st.lists(st.booleans(), min_size=n_grams, max_size=n_grams)))
    min_count = data.draw(st.integers(1, 3))
    grams = SharedGrams(np.array([len(s) for s in shared], dtype=np.int64),
                             np.array([g for s in shared for g in s], dtype=np.int64))
    max_pairs = data.draw(st.sampled_from([1, 3, 1 << 22]))   # blocks of records, or one
    got = _most_shared_eval(grams, [np.array(p, dtype=np.int64) for p in postings],
                                 is_train, counted, min_count, n_records, max_pairs)
    assert got == _most_shared_reference(shared, postings, is_train, counted, min_count)
    assert all(grams.of(i).tolist() == shared[i] for i in range(n_records))


def test_most_shared_eval_without_eval_ngrams():
    nothing = SharedGrams(np.zeros(3, dtype=np.int64), np.zeros(0, dtype=np.int32))
    assert _most_shared_eval(nothing, [], np.ones(3, dtype=bool), np.zeros(0, dtype=bool),
                                  2, 3) == {}


def test_length_policy_truncate_marks_and_keeps_golden_whole(tmp_path, tok):
    recs = base_records(30)
    long_answer = {"id": "long", "category": "lists", "instruction": "List 200 tokens.",
                   "response": " ".join(f"w{i}" for i in range(200))}
    path = write_lines(tmp_path / "in.jsonl", recs + [long_answer])
    out = tmp_path / "out"
    assert cli(tok, path, out, "--max-length", "160", "--length-policy", "truncate") == EXIT_OK
    o = outputs(out)
    rec = next(r for r in o["dataset"] if r["id"] == "long")
    assert rec["metadata"]["prep"]["truncated"] is True and rec["split"] != "golden"
    assert rec["metadata"]["prep"]["num_tokens"] == 160
    assert o["report"]["length"]["truncated"] == 1 and o["training"]["max_length"] == 160
    assert cli(tok, path, out, "--max-length", "160") == EXIT_OK     # default policy: drop
    o = outputs(out)
    assert [r["id"] for r in o["rejects"]] == ["long"]
    assert "> --max-length 160 (policy drop)" in o["rejects"][0]["detail"]


# ---------------------------------------------------------------------------------------------
# failures: exit 65 and nothing half-written

@pytest.mark.parametrize("content,top_reason", [
    (b"", None),
    (b'{"question": "q"}\n{"instruction": "i"}\n{"instruction": "i", "response": ""}\n',
     "empty_response"),
    (b"[1, 2, 3]\n", "not_an_object"),
])
def test_zero_valid_examples_exit_65(tmp_path, tok, capsys, content, top_reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    assert cli(tok, path, tmp_path / "out") == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 0 valid examples in") and len(err.splitlines()) == 1
    if top_reason:
        assert top_reason in err and f"(first at {path}:" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_json_object_top_level_exit_65(tmp_path, tok, capsys):
    (tmp_path / "in.json").write_text('{"records": [{"instruction": "a", "response": "b"}]}')
    assert cli(tok, tmp_path / "in.json", tmp_path / "out") == EXIT_DATA
    assert "0 valid examples" in capsys.readouterr().err


def test_too_many_invalid_records_exit_65_and_old_output_survives(tmp_path, tok, capsys):
    recs = base_records(20)
    good = write_lines(tmp_path / "good.jsonl", recs)
    out = tmp_path / "out"
    assert cli(tok, good, out) == EXIT_OK
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_lines(tmp_path / "bad.jsonl", recs[:15] + ["{oops"] * 3)
    assert cli(tok, bad, out) == EXIT_DATA
    err = capsys.readouterr().err
    assert "3 of 18 records (16.7%) are invalid, over --max-reject-fraction 0.1" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert cli(tok, bad, out, "--max-reject-fraction", "0.2") == EXIT_OK


def test_every_record_too_long_exit_65(tmp_path, tok, capsys):
    path = write_lines(tmp_path / "in.jsonl", base_records(5))
    assert cli(tok, path, tmp_path / "out", "--max-length", "20") == EXIT_DATA
    assert "every record is over --max-length 20" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the benchmark, at toy size

def test_bench_prep_smoke(tmp_path, tok):
    import bench_prep

    out = tmp_path / "prep.json"
    assert bench_prep.main(["--sizes", "200", "--output", str(out), "--tokenizer", tok,
                            "--data-dir", str(tmp_path / "data"), "--in-process"]) == 0
    assert (tmp_path / "data" / "bench-200.jsonl").is_file()
    result = json.loads(out.read_text())
    row = result["runs"][0]
    assert row["records"] == 200 and row["kept"] > 150
    assert row["records_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert set(row["phases_s"]) == {"read", "tokenize", "split", "decontaminate", "write"}
    assert result["machine"]["cpu_count"] >= 1


# ---------------------------------------------------------------------------------------------
# the committed demo data and sft_output/ are exactly what the generator and prep make

def test_committed_demo_data_and_sft_output_are_reproducible(tmp_path, embedded_dir, monkeypatch):
    demo_file = ROOT / "data" / "demo_enriched.jsonl"
    assert demo.main(["--output", str(tmp_path / "demo.jsonl")]) == 0
    assert (tmp_path / "demo.jsonl").read_bytes() == demo_file.read_bytes()
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sft_output"
    assert prep.main(["--enriched", "data/demo_enriched.jsonl", "--output-dir", str(out)]) == 0
    committed = ROOT / "sft_output"
    for name in OUTPUT_FILES:
        if name != "manifest.json":
            assert (out / name).read_bytes() == (committed / name).read_bytes(), name
    new, old = (json.loads((d / "manifest.json").read_text()) for d in (out, committed))
    assert new["files"] == old["files"] and new["inputs"] == old["inputs"]
    report = json.loads((committed / "prep_report.json").read_text())
    assert report["splits"]["golden"] == 150
    assert all(0.04 <= report["splits"][s] / report["counts"]["kept"] <= 0.06
               for s in ("val", "test"))
