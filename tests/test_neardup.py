"""Near-duplicate recall on short records (60-200 characters, the typical classification and
extraction record): one-word edits must be caught, distinct records of the same template kept.

The planted set is seeded: distinct templated records (sentiment, intent, topic, city and name
extraction; pairwise at least three words apart) and, for most of them, a copy with one word of
the prompt replaced, inserted or deleted (the answer unchanged). The prep command runs on it and
its ``rejects.jsonl`` says which records it dropped as near duplicates of which.
"""
from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline_sft_prep as prep
from llama_sft.errors import EXIT_OK
from llama_sft.prep.intake import Intake
from llama_sft.prep.minhash import text_jaccard
from llama_sft.prep.normalize import _NON_WORD, fuzzy_words
from llama_sft.prep.one_word import (SHORT_MIN_WORDS, SHORT_RECORD_CHARS, OneWordIndex,
                                     one_word_apart, short_prompt)
from llama_sft.prep.options import PrepConfig
from llama_sft.prep.report import RejectLog

MIN_CHARS, MAX_CHARS = 60, 200         # instruction + context + response
N_DISTINCT, N_PLANTED = 400, 300       # distinct records; one-word-edit copies of some of them
MIN_DISTINCT_WORDS = 3                 # word edit distance between any two distinct records,
MIN_CONTENT_WORDS = 2                  # and between their contents (the filled template slots)

SUBJECTS = ["the kettle", "this blender", "my new phone", "the hotel room", "the rain jacket",
            "this vacuum cleaner", "the delivery driver", "the hiking boots", "our rental car",
            "the coffee machine", "this laptop bag", "the yoga mat", "the toaster", "the headset",
            "my daughter's bike", "the garden hose", "the desk chair", "this novel", "the tent",
            "the pasta at dinner", "the support agent", "the printer", "this moisturiser",
            "the sofa cushions", "the smart watch", "the camping stove", "the bed frame"]
POSITIVE = ["works like a charm", "exceeded every expectation", "is worth every penny",
            "arrived early and well packed", "feels sturdy and well made", "is simply wonderful",
            "made my mornings easier", "still looks brand new", "was friendly and quick",
            "fits perfectly", "keeps us warm and dry", "is quiet and powerful"]
NEGATIVE = ["stopped working within days", "smells of cheap plastic", "fell apart quickly",
            "arrived scratched and dented", "was rude and unhelpful", "leaks from the bottom",
            "overheats constantly", "is far too small", "broke on the first trip",
            "drains the battery", "wobbles on every floor", "tastes completely bland"]
TAILS = ["", "", " after two weeks", " for the price", " in heavy rain", " on our holiday",
         " since the update", " during the winter", " at the weekend", " every single day",
         " despite the reviews", " right out of the box"]
SENTIMENT_INSTRUCTIONS = ["Classify the sentiment:", "Is this review positive or negative?",
                          "Label the sentiment of this review.", "Sentiment (positive/negative):"]

INTENTS = {
    "refund": ["I want my money back for {item}", "please refund the {item} I returned {when}",
               "can I get a refund on {item}"],
    "cancel": ["cancel my order of {item} please", "I no longer need the {item}, cancel it",
               "stop the {item} order I placed {when}"],
    "track": ["where is my {item} right now", "the {item} I ordered {when} has not arrived",
              "can you track the {item} parcel"],
    "address": ["send the {item} to my office instead", "I moved {when}, update the address "
                "for {item}", "change the delivery address for {item}"],
}
ITEMS = ["blue sneakers", "standing desk", "espresso grinder", "winter coat", "board game",
         "wireless mouse", "cast iron pan", "baby monitor", "reading lamp", "bluetooth speaker",
         "wool blanket", "electric toothbrush", "phone charger", "leather wallet", "air fryer",
         "kids' raincoat", "dining table", "running shorts", "paint set", "office chair"]
WHENS = ["yesterday", "last week", "on Monday", "two days ago", "this morning", "in March",
         "last Friday", "a month ago"]
INTENT_INSTRUCTIONS = ["Label the intent: refund, cancel, track or address.",
                       "What does the customer want?", "Intent of this message:"]

TOPICS = {
    "sports": ["{team} beat {team2} in a {adj} final", "{team} sign striker for record fee",
               "injury rules captain out of {team} season opener"],
    "business": ["{company} shares {move} after quarterly results",
                 "{company} to cut {n} jobs in {city}", "{company} opens new plant in {city}"],
    "science": ["telescope spots {adj} comet near {planet}", "researchers map {adj} coral reef",
                "new vaccine trial starts in {city}"],
    "politics": ["{city} mayor calls {adj} vote on budget", "parliament delays bill on {issue}",
                 "minister resigns over {issue} row"],
}
TEAMS = ["Rovers", "United", "Athletic", "Wanderers", "Rangers", "Albion", "Harriers", "Celtic"]
COMPANIES = ["Nordwind", "Acme Foods", "Brightline", "Kestrel Air", "Mosaic Bank", "Tellus Mining",
             "Orbital Labs", "Halcyon Motors"]
MOVES = ["jump", "slump", "climb", "tumble", "rally", "slide"]
ADJECTIVES = ["tense", "surprise", "record", "dramatic", "rare", "early", "bitter", "snap"]
PLANETS = ["Jupiter", "Saturn", "Mars", "Venus", "Neptune"]
ISSUES = ["housing", "fishing rights", "rail fares", "school meals", "water prices", "tax reform"]
TOPIC_INSTRUCTIONS = ["Topic of the headline (sports, business, science, politics)?",
                      "Classify this headline.", "Which news section fits?"]

CITIES = ["Lyon", "Porto", "Leeds", "Graz", "Ghent", "Malmo", "Turin", "Bergen", "Cork", "Basel",
          "Utrecht", "Krakow", "Seville", "Tampere", "Aarhus", "Bilbao", "Dresden", "Nantes"]
STREETS = ["Maple", "Station", "Church", "Harbour", "Mill", "Orchard", "Victoria", "Bridge",
           "Chestnut", "Market", "Willow", "Castle", "Meadow", "Kings", "Garden", "Rose"]
STREET_TYPES = ["Street", "Road", "Lane", "Avenue", "Close", "Way", "Terrace", "Crescent"]
CITY_INSTRUCTIONS = ["Extract the city from this address.", "Which city is this address in?",
                     "City only:"]
ADDRESS_PREFIXES = ["", "", "Ship to ", "Deliver to ", "Return address: ", "c/o Reception, "]

FIRST_NAMES = ["Ada", "Bruno", "Chiara", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
               "Kemal", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
LAST_NAMES = ["Abara", "Berg", "Costa", "Dubois", "Eriksen", "Fontaine", "Garcia", "Haddad",
              "Jensen", "Kowalski", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Tanaka"]
NAME_SENTENCES = ["The parcel was signed for by {name} at the front desk.",
                  "{name} will chair the meeting on {day}.", "Invoice approved by {name}.",
                  "Please call {name} about the broken {item}.",
                  "Our new hire {name} starts on {day} in {city}.",
                  "{name} reported the leak in the {city} office."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
NAME_INSTRUCTIONS = ["Extract the person's full name.", "Who is mentioned? Full name only."]

# second sentences that spread the records over 60-200 characters (label-neutral)
FILLERS = ["Sent from my phone.", "Thanks in advance.", "Ref {code}.", "See the attached photo.",
           "I am a customer since {year}.", "Reply by {day} please.", "Posted from {city}.",
           "Customer number C-{num}.", "Written in a hurry, sorry.", "Second message about this.",
           "Forwarded by {first} from the {city} office.", "Ticket opened on {day}.",
           "No rush on this one.", "My colleague {first} asked me to write."]

# words an edit inserts or substitutes (any part of speech, as typos and rewordings do)
EDIT_WORDS = ["really", "very", "also", "new", "just", "quite", "old", "still", "big", "the",
              "again", "please", "small", "now", "today", "urgent", "our", "some", "cheap",
              "totally", "mostly", "barely", "extra", "red", "second", "local", "kind"]


def _sentiment(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(["positive", "negative"])
    part = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    text = f"{rng.choice(SUBJECTS)} {part}{rng.choice(TAILS)}."
    return rng.choice(SENTIMENT_INSTRUCTIONS), text[0].upper() + text[1:], label


def _intent(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(sorted(INTENTS))
    text = rng.choice(INTENTS[label]).format(item=rng.choice(ITEMS), when=rng.choice(WHENS))
    return rng.choice(INTENT_INSTRUCTIONS), text[0].upper() + text[1:] + ".", label


def _topic(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(sorted(TOPICS))
    team, team2 = rng.sample(TEAMS, 2)
    text = rng.choice(TOPICS[label]).format(
        team=team, team2=team2, adj=rng.choice(ADJECTIVES), company=rng.choice(COMPANIES),
        move=rng.choice(MOVES), n=rng.randrange(50, 2000, 10), city=rng.choice(CITIES),
        planet=rng.choice(PLANETS), issue=rng.choice(ISSUES))
    return rng.choice(TOPIC_INSTRUCTIONS), text[0].upper() + text[1:], label


def _city(rng: random.Random) -> tuple[str, str, str]:
    city = rng.choice(CITIES)
    text = (f"{rng.choice(ADDRESS_PREFIXES)}{rng.randint(1, 240)} {rng.choice(STREETS)} "
            f"{rng.choice(STREET_TYPES)}, {city} {rng.randint(1000, 9999)}")
    return rng.choice(CITY_INSTRUCTIONS), text, city


def _name(rng: random.Random) -> tuple[str, str, str]:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    text = rng.choice(NAME_SENTENCES).format(name=name, day=rng.choice(DAYS),
                                             item=rng.choice(ITEMS), city=rng.choice(CITIES))
    return rng.choice(NAME_INSTRUCTIONS), text, name


MAKERS = {"sentiment": _sentiment, "intent": _intent, "topic": _topic, "city": _city,
          "name": _name}


def _fillers(rng: random.Random) -> str:
    picked = rng.sample(FILLERS, rng.randint(0, 3))
    return "".join(" " + f.format(code=f"{rng.choice('ABKRTX')}{rng.randint(100, 999)}",
                                  year=rng.randint(2005, 2023), day=rng.choice(DAYS),
                                  city=rng.choice(CITIES), num=rng.randint(10000, 99999),
                                  first=rng.choice(FIRST_NAMES)) for f in picked)


def _distinct_record(rng: random.Random, rec_id: str) -> tuple[dict, list[str]]:
    """One templated record whose length falls in a bin drawn uniformly over 60-200, and the
    words of its content (the context before the fillers)."""
    low = rng.randrange(MIN_CHARS, MAX_CHARS, 20)
    while True:
        category = rng.choice(sorted(MAKERS))
        inst, ctx, resp = MAKERS[category](rng)
        rec = {"id": rec_id, "category": category, "instruction": inst,
               "context": ctx + _fillers(rng), "response": resp}
        if low <= _chars(rec) < low + 20:
            return rec, _words({"instruction": "", "context": ctx, "response": ""})


def _chars(rec: dict) -> int:
    return len(rec["instruction"]) + len(rec["context"]) + len(rec["response"])


def _words(rec: dict) -> list[str]:
    text = f"{rec['instruction']} {rec['context']} {rec['response']}".casefold()
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text).split()


def word_distance(a: list[str], b: list[str], cap: int) -> int:
    """Word-level Levenshtein distance of ``a`` and ``b``, or ``cap`` if it is at least that."""
    if abs(len(a) - len(b)) >= cap:
        return cap
    if sum((Counter(a) - Counter(b)).values()) + sum((Counter(b) - Counter(a)).values()) \
            >= 2 * cap:
        return cap                      # an edit changes at most two word counts
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        if min(current) >= cap:
            return cap
        previous = current
    return min(previous[-1], cap)


def _one_word_edit(rng: random.Random, rec: dict, kind: str) -> dict | None:
    """``rec`` with one word of its instruction or context replaced, inserted or deleted (never
    a word of the answer, so the copy still answers its prompt); None if no try fits."""
    answer = set(rec["response"].casefold().split())
    fields = [f for f in ("instruction", "context") if rec[f].split()]
    for _ in range(100):
        field = rng.choice(fields)
        words = rec[field].split()
        if kind == "insert":
            words.insert(rng.randint(0, len(words)), rng.choice(EDIT_WORDS))
        else:
            at = rng.randrange(len(words))
            if words[at].casefold().strip(".,:?!") in answer or (kind == "delete"
                                                                 and len(words) < 2):
                continue
            if kind == "delete":
                del words[at]
            else:
                new = rng.choice(EDIT_WORDS)
                if new == words[at].casefold():
                    continue
                words[at] = new
        copy = dict(rec, **{field: " ".join(words)})
        if MIN_CHARS <= _chars(copy) <= MAX_CHARS and word_distance(
                _words(rec), _words(copy), 2) == 1:
            return copy
    return None


def planted_set(seed: int = 11) -> tuple[list[dict], dict[str, str]]:
    """(records in input order, {planted copy id: id of the record it copies})."""
    rng = random.Random(seed)
    distinct: list[dict] = []
    seen: list[tuple[list[str], list[str]]] = []     # (words, content words) of each
    while len(distinct) < N_DISTINCT:
        rec, content = _distinct_record(rng, f"rec-{len(distinct):03d}")
        words = _words(rec)
        if all(word_distance(content, c, MIN_CONTENT_WORDS) >= MIN_CONTENT_WORDS
               and word_distance(words, w, MIN_DISTINCT_WORDS) >= MIN_DISTINCT_WORDS
               for w, c in seen):
            distinct.append(rec)
            seen.append((words, content))
    kinds = ["substitute", "insert", "delete"]
    copies = {}
    for rec in rng.sample(distinct, N_DISTINCT):
        kind = kinds[len(copies) % 3]
        copy = _one_word_edit(rng, rec, kind)
        if copy is not None:
            copies[rec["id"]] = dict(copy, id=f"{rec['id']}-{kind}")
        if len(copies) == N_PLANTED:
            break
    # input order: the distinct records shuffled, each copy somewhere after its original
    order = distinct[:]
    rng.shuffle(order)
    for rec_id, copy in copies.items():
        after = next(i for i, r in enumerate(order) if r["id"] == rec_id)
        order.insert(rng.randint(after + 1, len(order)), copy)
    return order, {copy["id"]: rec_id for rec_id, copy in copies.items()}


def neardup_figures(rejects: list[dict], planted: dict[str, str]) -> dict:
    """Recall over the planted pairs, and every distinct record merged into another."""
    dropped = {r["id"]: (r["reason"], r.get("duplicate_of")) for r in rejects}
    caught = sum(dropped.get(copy) == ("near_duplicate", original)
                 for copy, original in planted.items())
    wrong = sorted(rec_id for rec_id, (_, of) in dropped.items()
                   if of is not None and planted.get(rec_id) != of)
    return {"planted": len(planted), "caught": caught, "recall": caught / len(planted),
            "false_merges": wrong}


def test_planted_set_is_what_it_claims():
    records, planted = planted_set()
    assert len(records) == N_DISTINCT + N_PLANTED == len({r["id"] for r in records})
    assert all(MIN_CHARS <= _chars(r) <= MAX_CHARS for r in records)
    by_id = {r["id"]: r for r in records}
    position = {r["id"]: i for i, r in enumerate(records)}
    for copy, original in planted.items():
        assert position[copy] > position[original]
        assert by_id[copy]["response"] == by_id[original]["response"]
        assert word_distance(_words(by_id[copy]), _words(by_id[original]), 2) == 1
    assert {c.rsplit("-", 1)[1] for c in planted} == {"substitute", "insert", "delete"}
    assert len({r["category"] for r in records}) == len(MAKERS)


@pytest.fixture
def tok(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def test_one_word_edits_of_short_records_are_caught_and_distinct_ones_kept(tmp_path, tok):
    records, planted = planted_set()
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    assert prep.main(["--enriched", str(path), "--output-dir", str(out), "--tokenizer", tok,
                      "--golden-size", "6"]) == EXIT_OK
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    figures = neardup_figures(rejects, planted)
    print(json.dumps(figures))
    assert figures["recall"] >= 0.95, figures
    assert figures["false_merges"] == [], figures
    report = json.loads((out / "prep_report.json").read_text())
    assert report["dedup"]["near"] == figures["caught"]
    one_word = sum("prompt one word apart" in r["detail"] for r in rejects)
    assert 0 < one_word <= figures["caught"] and report["dedup"]["near_one_word"] == one_word


# ---------------------------------------------------------------------------------------------
# the parts: word normalization, the one-word test, the index, and where the rule applies

@settings(max_examples=300, deadline=None)
@given(st.text() | st.text(st.characters(max_codepoint=127)))
def test_fuzzy_words_match_the_regular_expression(text):
    assert fuzzy_words(text) == _NON_WORD.sub(" ", text.casefold()).split()


WORDS = st.lists(st.sampled_from("abcde"), max_size=12)


@settings(max_examples=500, deadline=None)
@given(WORDS, WORDS)
def test_one_word_apart_is_a_word_edit_distance_of_one_at_most(a, b):
    assert one_word_apart(a, b) == (word_distance(a, b, 2) <= 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["the", "order", "city", "of", "a", "is", "red", "to", "x"]),
                min_size=SHORT_MIN_WORDS - 1, max_size=45),
       st.sampled_from(["substitute", "insert", "delete"]), st.integers(0, 10**6),
       st.booleans())
def test_the_one_word_index_finds_every_prompt_one_word_apart(words, kind, where, copy_first):
    at = where % (len(words) + (kind == "insert"))
    edited = list(words)
    if kind == "insert":
        edited.insert(at, "inserted")
    elif kind == "delete":
        del edited[at]
    else:
        edited[at] = "replaced"
    first, then = (edited, words) if copy_first else (words, edited)
    if min(len(first), len(then)) < SHORT_MIN_WORDS:
        return
    index = OneWordIndex()
    index.add(7, short_prompt(" ".join(first), "the answer"))
    assert index.query(short_prompt(" ".join(then), "The answer.")) == [7]
    assert index.query(short_prompt(" ".join(then), "another answer")) == []
    twice = then + ["more", "words"]
    assert index.query(short_prompt(" ".join(twice), "the answer")) == []


def _intake(tmp_path: Path, records: list[dict]) -> list[dict]:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    buf = io.StringIO()
    Intake(PrepConfig(enriched=(str(path),)), RejectLog(buf), progress=False).read()
    return [json.loads(line) for line in buf.getvalue().splitlines()]


LONG_WORD = "supercalifragilisticexpialidocious"


@pytest.mark.parametrize("context, other_answer, short, merged", [
    ("Ship the parcel to 12 Station Road, Leeds.", "Leeds", True, True),
    ("Ship the parcel to 12 Station Road, Leeds.", "Porto", True, False),      # other answer
    ("Ship the parcel to 12 Station Road, Leeds. " + "We also need the invoice copy. " * 4,
     "Leeds", False, False),                                        # over SHORT_RECORD_CHARS
])
def test_one_word_rule_takes_short_records_with_the_same_answer_only(tmp_path, context,
                                                                     other_answer, short, merged):
    original = {"id": "a", "instruction": "Extract the city from the order.",
                "context": context.replace("Station", LONG_WORD), "response": "Leeds"}
    copy = dict(original, id="b", context=context, response=other_answer)
    assert short == (_chars(original) <= SHORT_RECORD_CHARS and _chars(copy) <= SHORT_RECORD_CHARS)
    # the edit replaces a long word: far under the Jaccard threshold at either length
    assert text_jaccard(f"{original['instruction']} {original['context']}",
                        f"{copy['instruction']} {copy['context']}") < 0.85
    rejects = _intake(tmp_path, [original, copy])
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in rejects] == \
        ([("b", "near_duplicate", "a")] if merged else [])
    if merged:
        assert "prompt one word apart" in rejects[0]["detail"]
