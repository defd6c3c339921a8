"""llama_metrics: hand-checked small cases, and equality with rouge-score / sacrebleu."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_sft.evaluate.metrics import (corpus_bleu, corpus_chrf, exact_match, exact_match_strict,
                                        json_scores, normalize_answer, rouge_l, score_example,
                                        sentence_bleu, summarize_generations, token_f1)


def test_normalize_answer():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("") == ""


def test_exact_match():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("Positive", "positive") == 1.0
    assert exact_match("positive!", "negative") == 0.0
    assert exact_match_strict(" positive\n", "positive") == 1.0
    assert exact_match_strict("Positive", "positive") == 0.0


def test_token_f1_hand_checked():
    # pred {cat, sat} vs ref {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    # repeated tokens count once each in the overlap: x:1 + y:1 -> P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("completely different", "nothing shared") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "something") == 0.0


def test_rouge_l_hand_checked_and_equals_library():
    from rouge_score import rouge_scorer

    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat (5 of 6)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, ref = "The quick brown foxes jumped", "a quick brown fox jumps over"
    assert rouge_l(pred, ref) == scorer.score(ref, pred)["rougeL"].fmeasure
    assert rouge_l("", "anything") == 0.0


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog barked loudly at night", "hello"]
    refs = ["the cat is on the mat", "the dog barked loudly all night", "hello there"]
    assert corpus_bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score
    assert corpus_chrf(preds, refs) == sacrebleu.corpus_chrf(preds, [refs]).score
    assert sentence_bleu(preds[0], refs[0]) == sacrebleu.sentence_bleu(preds[0], [refs[0]]).score
    assert corpus_bleu(["same words here today"], ["same words here today"]) == pytest.approx(100)
    assert corpus_chrf(["identical"], ["identical"]) == pytest.approx(100)
    assert corpus_bleu([], []) == 0.0


def test_json_scores():
    ref = '{"order": 1003, "status": "late"}'
    fenced = '```json\n{"order": 1003, "status": "early"}\n```'
    assert json_scores(fenced, ref) == {"json_valid": 1.0, "json_field_accuracy": 0.5,
                                        "fields": {"order": 1.0, "status": 0.0}}
    assert json_scores('{"status": "late", "order": 1003}', ref)["json_field_accuracy"] == 1.0
    assert json_scores("order 1003", ref) == {"json_valid": 0.0, "json_field_accuracy": 0.0,
                                              "fields": {"order": 0.0, "status": 0.0}}
    assert json_scores("[1, 2]", ref)["json_field_accuracy"] == 0.0  # valid, but not an object
    assert json_scores("[1, 2]", "[1, 2]") == {"json_valid": 1.0, "json_field_accuracy": 1.0,
                                               "fields": {}}
    assert json_scores("positive", "positive") is None  # plain-text reference
    assert json_scores("2", "4") is None                # a bare number is not a JSON answer


def test_score_example_keys():
    scores = score_example("positive", "positive")
    assert scores == {"exact_match": 1.0, "exact_match_strict": 1.0, "token_f1": 1.0,
                      "rouge_l": 1.0, "bleu": pytest.approx(sentence_bleu("positive", "positive")),
                      "chrf": pytest.approx(100), "json_valid": None, "json_field_accuracy": None}


def test_summarize_generations():
    preds = ["positive", '{"order": 7}', '{"order": 8, "x": 1}', "4"]
    refs = ["positive", '{"order": 7}', '{"order": 9}', "five"]
    out = summarize_generations(preds, refs)
    assert out["exact_match"] == pytest.approx(2 / 4)
    assert out["json_examples"] == 2
    assert out["json_valid"] == 1.0
    assert out["json_field_accuracy"] == pytest.approx(0.5)
    assert out["json_fields"] == {"order": 0.5}
    import sacrebleu
    assert out["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    plain = summarize_generations(["a"], ["b"])
    assert plain["json_valid"] is None and plain["json_examples"] == 0
    assert plain["json_fields"] == {}


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_token_f1_properties(pred, ref):
    f1 = token_f1(pred, ref)
    assert 0.0 <= f1 <= 1.0
    assert f1 == pytest.approx(token_f1(ref, pred))
    if exact_match(pred, ref):
        assert f1 == 1.0
