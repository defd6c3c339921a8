"""Metric functions for evaluating generations against reference responses.

Pure functions on strings (no model): the evaluation stage (``llama_evaluate.py``) calls them,
tests check them on hand-worked cases. Scales: ``exact_match``, ``token_f1``, ``rouge_l`` and the
JSON metrics are fractions in [0, 1]; ``bleu`` and ``chrf`` are on sacrebleu's 0-100 scale.

- ``exact_match``: equal after SQuAD normalisation (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed); ``exact_match_strict``: equal after ``strip()``.
- ``token_f1``: SQuAD token-overlap F1 on the normalised words.
- ``rouge_l``: rouge-score's ROUGE-L F-measure (Porter stemming on).
- ``bleu`` / ``chrf``: sacrebleu (corpus-level for a set, sentence-level for one example).
- ``json_valid``: the generation parses as JSON (a whole-text Markdown code fence is removed
  first); only counted where the reference itself is a JSON object or array.
- ``json_field_accuracy``: share of the reference object's top-level fields that the generated
  object has with an equal value (the whole value must be equal for an array reference).
"""
from __future__ import annotations

import collections
import json
import re
import string
from functools import lru_cache
from typing import Any, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Text overlap


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def exact_match_strict(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1; two empty answers agree (1.0), one empty answer scores 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from rouge-score (the reference is its ``target``)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score


def sentence_chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


# ---------------------------------------------------------------------------------------------
# JSON answers

_NOT_JSON = object()


def parse_json(text: str) -> Any:
    """The parsed value of ``text`` (a whole-text code fence removed), or ``_NOT_JSON``."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return _NOT_JSON


def json_reference(reference: str) -> Any:
    """The reference's parsed value when it is a JSON object or array, else None."""
    value = parse_json(reference)
    return value if isinstance(value, (dict, list)) else None


def json_scores(prediction: str, reference: str) -> dict[str, Any] | None:
    """``json_valid``, ``json_field_accuracy`` and per-field hits, or None for non-JSON refs."""
    ref = json_reference(reference)
    if ref is None:
        return None
    pred = parse_json(prediction)
    valid = pred is not _NOT_JSON
    if isinstance(ref, dict):
        fields = {key: float(isinstance(pred, dict) and key in pred and pred[key] == value)
                  for key, value in ref.items()}
        accuracy = sum(fields.values()) / len(fields) if fields else float(pred == ref)
    else:
        fields = {}
        accuracy = float(valid and pred == ref)
    return {"json_valid": float(valid), "json_field_accuracy": accuracy, "fields": fields}


# ---------------------------------------------------------------------------------------------
# Per example and per set


def score_example(prediction: str, reference: str) -> dict[str, Any]:
    """Every per-example score of one generation (JSON scores are None for non-JSON refs)."""
    js = json_scores(prediction, reference)
    return {"exact_match": exact_match(prediction, reference),
            "exact_match_strict": exact_match_strict(prediction, reference),
            "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference),
            "bleu": sentence_bleu(prediction, reference),
            "chrf": sentence_chrf(prediction, reference),
            "json_valid": None if js is None else js["json_valid"],
            "json_field_accuracy": None if js is None else js["json_field_accuracy"]}


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize_generations(predictions: Sequence[str], references: Sequence[str],
                          scores: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Set-level text metrics over aligned (prediction, reference) pairs.

    Means of the per-example scores, except ``bleu`` and ``chrf``, which are corpus-level (as
    sacrebleu defines them). ``json_*`` are over the pairs whose reference is JSON (None when
    there are none); ``json_fields`` maps each reference field to its accuracy.
    """
    if scores is None:
        scores = [score_example(p, r) for p, r in zip(predictions, references)]
    out: dict[str, Any] = {
        key: mean(s[key] for s in scores)
        for key in ("exact_match", "exact_match_strict", "token_f1", "rouge_l")}
    out["bleu"] = corpus_bleu(predictions, references)
    out["chrf"] = corpus_chrf(predictions, references)
    field_hits: dict[str, list[float]] = collections.defaultdict(list)
    json_pairs = 0
    for prediction, reference in zip(predictions, references):
        js = json_scores(prediction, reference)
        if js is None:
            continue
        json_pairs += 1
        for name, hit in js["fields"].items():
            field_hits[name].append(hit)
    out["json_examples"] = json_pairs
    out["json_valid"] = mean(s["json_valid"] for s in scores if s["json_valid"] is not None)
    out["json_field_accuracy"] = mean(s["json_field_accuracy"] for s in scores
                                      if s["json_field_accuracy"] is not None)
    out["json_fields"] = {name: mean(hits) for name, hits in sorted(field_hits.items())}
    return out
