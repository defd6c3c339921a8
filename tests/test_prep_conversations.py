"""Multi-turn records in the prep stage: OpenAI ``messages`` and ShareGPT ``conversations``
(and ``--field-map``) in, the whole conversation out under ``messages``; bad shapes rejected with
reason, file and line; one-exchange chats unchanged; dedup, near-dup and PII on whole
conversations.

Each test runs ``pipeline_sft_prep.main`` end to end on the tiny model's tokenizer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "data"))

import make_demo_data as demo  # noqa: E402
import pipeline_sft_prep as prep  # noqa: E402
from llama_sft.errors import EXIT_OK
from llama_sft.prep.records import exact_key, fuzzy_source

SCHEMA_KEYS = ["id", "split", "category", "instruction", "context", "response", "metadata"]
MULTI_TURN_KEYS = ["id", "split", "category", "instruction", "context", "response", "messages",
                   "metadata"]


@pytest.fixture
def tok(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def filler(n: int = 20) -> list[dict]:
    """Distinct clean single-turn records, so every split has records."""
    return list(demo.clean_records(n, 5))


def run(tok: str, tmp_path: Path, lines: list[dict], *extra: str, name: str = "out") -> dict:
    """Prep ``lines`` (JSONL, line 1 first) into ``tmp_path / name``; returns its outputs."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                    encoding="utf-8")
    out = tmp_path / name
    assert prep.main(["--enriched", str(path), "--output-dir", str(out), "--tokenizer", tok,
                      "--golden-size", "4", "--max-reject-fraction", "1", *extra]) == EXIT_OK
    records = [json.loads(line) for name in ("sft_dataset.jsonl", "golden_set.jsonl")
               for line in (out / name).read_text(encoding="utf-8").splitlines()]
    return {"path": str(path), "out": out, "records": {r["id"]: r for r in records},
            "rejects": [json.loads(line) for line in
                        (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()],
            "report": json.loads((out / "prep_report.json").read_text())}


def chat(*turns: tuple[str, str], keys: tuple[str, str] = ("role", "content")) -> list[dict]:
    role, content = keys
    return [{role: r, content: c} for r, c in turns]


OPENAI = chat(("system", "You answer questions about trains."),
              ("user", "How long is the Gotthard base tunnel?"),
              ("assistant", "About 57 kilometres."),
              ("user", "When did it open?"),
              ("assistant", "It opened in 2016."))
SHAREGPT = chat(("system", "Be concise."), ("human", "Name a prime number above ten."),
                ("gpt", "Eleven."), ("human", "And one above twenty?"), ("gpt", "Twenty-three."),
                keys=("from", "value"))
ALIASES = chat(("user", "Pick a colour for the fence."), ("chatgpt", "Green."),
               ("Human", "Why green?"), ("BOT", "It blends with the hedge."),
               keys=("from", "value"))


# ---------------------------------------------------------------------------------------------
# shapes in, conversations out

def test_multi_turn_records_keep_the_whole_conversation(tmp_path, tok):
    lines = filler() + [{"id": "oa", "category": "qa", "messages": OPENAI, "source": "logs"},
                        {"id": "sg", "conversations": SHAREGPT},
                        {"id": "al", "messages": ALIASES}]
    o = run(tok, tmp_path, lines)
    assert o["rejects"] == []
    oa, sg, al = (o["records"][k] for k in ("oa", "sg", "al"))
    assert all(list(r) == MULTI_TURN_KEYS for r in (oa, sg, al))
    assert (oa["instruction"], oa["context"], oa["response"]) == \
        ("When did it open?", "", "It opened in 2016.")
    assert oa["messages"] == OPENAI
    assert oa["metadata"]["source"] == "logs" and "system_prompt" not in oa["metadata"]
    assert (sg["instruction"], sg["response"]) == ("And one above twenty?", "Twenty-three.")
    assert [m["role"] for m in sg["messages"]] == \
        ["system", "user", "assistant", "user", "assistant"]
    assert sg["messages"][0]["content"] == "Be concise."
    assert [m["role"] for m in al["messages"]] == ["user", "assistant"] * 2
    assert al["response"] == "It blends with the hedge."
    assert o["report"]["shapes"] == {"chat": 2, "instruction_response": 20, "sharegpt": 1}


def as_chat(record: dict, field: str, keys: tuple[str, str] = ("role", "content")) -> dict:
    """A single-turn record as a one-exchange conversation under ``field``."""
    user = f"{record['instruction']}\n\n{record['context']}".strip()
    return {"id": record["id"], field: chat(("user", user), ("assistant", record["response"]),
                                            keys=keys)}


def test_field_map_names_the_conversation_field(tmp_path, tok):
    lines = [as_chat(r, "dialog") for r in filler()] + \
        [{"id": "fm", "dialog": OPENAI, "source": "x"}, {"id": "gone", "messages": OPENAI}]
    o = run(tok, tmp_path, lines, "--field-map", "messages=dialog", name="messages")
    rec = o["records"]["fm"]
    assert rec["messages"] == OPENAI and rec["metadata"] == {"source": "x",
                                                             "prep": rec["metadata"]["prep"]}
    assert o["report"]["shapes"] == {"chat": 21}
    assert [(r["line"], r["reason"], r["detail"]) for r in o["rejects"]] == \
        [(22, "missing_field", "field 'dialog' is missing")]
    lines = [as_chat(r, "turns", ("from", "value")) for r in filler()] + \
        [{"id": "fm", "turns": SHAREGPT}]
    o = run(tok, tmp_path, lines, "--field-map", "conversations=turns", name="conversations")
    assert o["records"]["fm"]["response"] == "Twenty-three."
    assert o["report"]["shapes"] == {"sharegpt": 21} and o["rejects"] == []


def test_every_turn_is_cleaned(tmp_path, tok):
    messy = chat(("system", " Be\u00a0kind. "), ("user", "Hi\u200b there"),
                 ("assistant", "Hello!  "), ("user", "Bye\r\nnow"), ("assistant", "Bye."))
    o = run(tok, tmp_path, filler() + [{"id": "m", "messages": messy}])
    rec = o["records"]["m"]
    assert [m["content"] for m in rec["messages"]] == \
        ["Be kind.", "Hi there", "Hello!", "Bye\nnow", "Bye."]
    assert (rec["instruction"], rec["response"]) == ("Bye\nnow", "Bye.")


# ---------------------------------------------------------------------------------------------
# bad shapes: reason, detail, file and line

U, A, S = ("user", "Hello there"), ("assistant", "Hi, how can I help?"), ("system", "Be nice.")
BAD = [  # (messages, reason, detail fragment)
    (chat(U, A, U, A, A), "bad_chat", "message 4 is a second assistant turn in a row"),
    (chat(U, A, U, U, A), "bad_chat", "message 3 is a second user turn in a row"),
    (chat(U, A, ("user", "More?"), ("assistant", " \u200b\n ")), "empty_response",
     "message 3: the assistant turn is empty after cleaning"),
    (chat(U, ("assistant", "\t"), ("user", "More?"), A), "empty_response",
     "message 1: the assistant turn is empty after cleaning"),
    (chat(("user", "\u00a0"), A, U, A), "empty_instruction",
     "message 0: the user turn is empty after cleaning"),
    (chat(U, A, ("user", "More?")), "bad_chat",
     "message 2 is a user turn; the conversation must end on an assistant turn"),
    (chat(U, A, ("narrator", "Meanwhile"), A), "bad_chat", "message 2 has unknown role 'narrator'"),
    (chat(U, A, U, A, keys=("speaker", "content")), "bad_chat", "message 0 has no role"),
    ([U, *chat(A, U, A)], "bad_chat", "message 0 is an array, not an object"),
    (chat(U, A, ("user", ["a", "list"]), A), "wrong_type", "message 2 content is an array"),
    (chat(U, A, S, U, A), "bad_chat", "message 2 is a system turn; only the first message"),
    (chat(S, A, U, A), "bad_chat", "message 1 is an assistant turn; the conversation must start "
                                   "with a user turn"),
    (chat(S, U), "bad_chat", "the conversation has no assistant turn"),
    ([], "bad_chat", "the conversation has no assistant turn"),
]


def test_bad_conversations_are_rejected_with_reason_and_line(tmp_path, tok):
    good = filler()
    lines = good[:10] + [{"id": f"bad{i}", "messages": m} for i, (m, _, _) in enumerate(BAD)] \
        + [{"id": "bad-sharegpt", "conversations": chat(("human", "Hi"), ("gpt", "Hello"),
                                                        ("gpt", "Anyone?"),
                                                        keys=("from", "value"))}] + good[10:]
    o = run(tok, tmp_path, lines)
    got = {r["line"]: (r["file"], r["id"], r["reason"], r["detail"]) for r in o["rejects"]}
    for i, (_, reason, fragment) in enumerate(BAD):
        file, rec_id, got_reason, detail = got.pop(11 + i)
        assert (file, rec_id, got_reason) == (o["path"], f"bad{i}", reason)
        assert fragment in detail, (i, detail)
    assert got == {11 + len(BAD): (o["path"], "bad-sharegpt", "bad_chat",
                                   "message 2 is a second assistant turn in a row; expected one "
                                   "user turn then one assistant turn, alternating")}
    assert len(o["records"]) == 20


# ---------------------------------------------------------------------------------------------
# one exchange: the record of today

def test_one_exchange_chat_gives_the_same_record_as_instruction_response(tmp_path, tok):
    base = filler()
    extra = {"category": "qa", "source": "s"}
    plain = {"id": "one", **extra, "instruction": "How long is the Gotthard base tunnel?",
             "response": "About 57 kilometres.", "system_prompt": "Be brief."}
    turns = (("system", "Be brief."), ("user", plain["instruction"]),
             ("assistant", plain["response"]))
    as_chat = {"id": "one", **extra, "messages": chat(*turns)}
    as_sharegpt = {"id": "one", **extra, "conversations": chat(*turns, keys=("from", "value"))}
    runs = [run(tok, tmp_path, base + [line], name=name) for name, line in
            (("plain", plain), ("chat", as_chat), ("sharegpt", as_sharegpt))]
    for name in ("sft_dataset.jsonl", "golden_set.jsonl", "rejects.jsonl"):
        want = (runs[0]["out"] / name).read_bytes()
        assert [(o["out"] / name).read_bytes() for o in runs[1:]] == [want, want], name
    rec = runs[1]["records"]["one"]
    assert list(rec) == SCHEMA_KEYS and rec["metadata"]["system_prompt"] == "Be brief."
    assert [o["report"]["shapes"] for o in runs] == [
        {"instruction_response": 21}, {"chat": 1, "instruction_response": 20},
        {"instruction_response": 20, "sharegpt": 1}]


# ---------------------------------------------------------------------------------------------
# dedup, near-dup and PII on whole conversations

LONG = chat(("user", "I am planning a three day walking trip through the Lake District in late "
                     "April. What should I pack for changeable weather?"),
            ("assistant", "Pack a waterproof jacket and overtrousers, a warm fleece, a hat and "
                          "gloves, broken-in boots, a map and compass, and spare socks."),
            ("user", "Which valley makes a good base for the first night of the trip?"),
            ("assistant", "Borrowdale is a good base: it has several inns and hostels and many "
                          "walks start from the valley floor."))


def test_near_and_exact_duplicate_conversations(tmp_path, tok):
    one_word = [dict(t) for t in LONG]
    one_word[1]["content"] = one_word[1]["content"].replace("warm fleece", "thick fleece")
    spaced = [dict(t, content=t["content"].replace(" ", "  ")) for t in LONG]
    other_start = [dict(t) for t in LONG]
    other_start[0]["content"] = "Tell me about walking holidays in England in spring."
    other_start[1]["content"] = "The Lake District and the Peak District are both popular."
    last_exchange = {"id": "last-only", "instruction": LONG[2]["content"],
                     "response": LONG[3]["content"]}
    lines = filler() + [{"id": "first", "messages": LONG}, {"id": "word", "messages": one_word},
                        {"id": "spaced", "messages": spaced},
                        {"id": "other-start", "messages": other_start}, last_exchange]
    o = run(tok, tmp_path, lines)
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in o["rejects"]] == [
        ("word", "near_duplicate", "first"), ("spaced", "duplicate", "first")]
    assert {"first", "other-start", "last-only"} <= set(o["records"])


def test_swapping_user_and_assistant_text_changes_the_keys():
    record = {"instruction": "c", "context": "", "response": "d",
              "messages": chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                               ("assistant", "d"))}
    swapped = dict(record, messages=chat(("user", "b"), ("assistant", "a"), ("user", "c"),
                                         ("assistant", "d")))
    assert exact_key(record) != exact_key(swapped)
    assert fuzzy_source(record) == "user: a\n\nassistant: b\n\nuser: c d"
    single = {"instruction": "c", "context": "", "response": "d"}
    assert fuzzy_source(single) == "c d"


def test_pii_in_a_middle_turn_is_scrubbed_and_counted_once(tmp_path, tok):
    turns = chat(("user", "My address is bob@corp.example, can you remember it?"),
                 ("assistant", "I will not store it. Call 020 7946 0958 for support."),
                 ("user", "Mail carol@corp.example about it."),
                 ("assistant", "Done."))
    o = run(tok, tmp_path, filler() + [{"id": "pii", "messages": turns}])
    rec = o["records"]["pii"]
    assert [m["content"] for m in rec["messages"]] == [
        "My address is [EMAIL], can you remember it?",
        "I will not store it. Call [PHONE] for support.",
        "Mail [EMAIL] about it.", "Done."]
    assert rec["instruction"] == "Mail [EMAIL] about it."
    assert o["report"]["pii"] == {"enabled": True, "email": 2, "phone": 1, "api_key": 0,
                                  "records": 1}
