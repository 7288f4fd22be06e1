"""COCO caption metrics: equal to pycocoevalcap called directly, sane orders, errors, no Java."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from dist_caption import metrics
from dist_caption.metrics import caption_metrics, format_metrics

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: the PTB tokenizer and METEOR need it")

REFS = {
    "1": ["A man is riding a red bicycle down the street.",
          "A person rides a red bike on a city street.", "Man cycling on the road."],
    "2": ["Two dogs are playing with a ball in the grass.",
          "A pair of dogs chase a ball on the lawn."],
    "3": ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
          "A dinner plate holding rice and vegetables."],
    "4": ["A cat sleeping on a laptop keyboard.", "The cat's asleep on the computer."],
}
EXACT = {k: refs[0] for k, refs in REFS.items()}
UNRELATED = {"1": "An airplane flying over snowy mountains.",
             "2": "A bowl of soup next to a spoon.",
             "3": "Surfers waiting for a wave at sunset.", "4": "A clock tower in an old town."}
# From an exact copy (1) through a paraphrase (2) and a vague caption (3) to an unrelated one (4).
MIXED = {"1": EXACT["1"], "2": "Two dogs play with a ball on the grass.",
         "3": "A plate with some food on it.", "4": UNRELATED["4"]}
NO_METEOR = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}


@pytest.fixture
def no_java(monkeypatch):
    """`java` missing from PATH, and any attempt to start a process fails the test."""
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started without java: {args}")

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    metrics._warn_no_java.cache_clear()


@needs_java
@pytest.mark.slow
def test_equals_pycocoevalcap_called_directly(monkeypatch):
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in MIXED.items()})
    meteor = Meteor()
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_all, meteor_each = meteor.compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    want = {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
            "METEOR": meteor_all, "ROUGE-L": rouge, "CIDEr": cider}

    # caption_metrics reuses this METEOR JVM: loading a second one costs 6-30 s here.
    monkeypatch.setattr(metrics, "Meteor", lambda: meteor)
    got, each = metrics.caption_scores(MIXED, REFS)
    assert got == pytest.approx(want, rel=1e-12)
    assert all(type(v) is float for v in got.values())
    assert 0 < got["METEOR"] < 1
    ids = list(MIXED)  # pycocoevalcap's per-image lists follow the dict order of res
    for key, values in (("BLEU-4", bleu_each[3]), ("METEOR", meteor_each),
                        ("ROUGE-L", rouge_each), ("CIDEr", cider_each)):
        assert [each[i][key] for i in ids] == pytest.approx(list(values), rel=1e-12), key
    assert each["1"]["CIDEr"] > each["4"]["CIDEr"]


def test_identical_captions_score_top_and_unrelated_bottom():
    exact = caption_metrics(EXACT, REFS, meteor=False)
    unrelated = caption_metrics(UNRELATED, REFS, meteor=False)
    assert set(exact) == NO_METEOR
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["ROUGE-L"] == pytest.approx(1.0)
    assert exact["CIDEr"] > 2 and exact["CIDEr"] > 20 * unrelated["CIDEr"]
    assert unrelated["BLEU-4"] < 1e-3


def test_better_captions_score_higher():
    scores = [caption_metrics(p, REFS, meteor=False) for p in (EXACT, MIXED, UNRELATED)]
    for key in NO_METEOR:
        assert scores[0][key] > scores[1][key] > scores[2][key], key


def test_awkward_captions_are_scored_not_misaligned():
    spaced = {**MIXED, "2": "Two dogs play with a ball on the grass. Café 日本!", "3": ""}
    # A carriage return or U+2028 must not shift later captions onto the wrong image.
    broken = {**spaced, "2": "Two dogs play\rwith a ball\u2028on the grass.\nCafé 日本!"}
    got = caption_metrics(broken, REFS, meteor=False)
    assert got == pytest.approx(caption_metrics(spaced, REFS, meteor=False), rel=1e-12)
    assert all(math.isfinite(v) and v >= 0 for v in got.values())
    assert got["CIDEr"] < caption_metrics(MIXED, REFS, meteor=False)["CIDEr"]


@pytest.mark.parametrize("predictions, references, message", [
    ({"1": "a dog"}, {"1": ["a dog"], "2": ["a cat"]}, r"1 ids without a prediction \['2'\]"),
    ({"1": "a dog", "9": "a cat"}, {"1": ["a dog"]}, r"1 without references \['9'\]"),
    ({"1": "a dog"}, {"1": []}, "image '1' has an empty reference list"),
    ({"1": "a dog"}, {"1": "a dog"}, "references of image '1' are a string"),
    ({}, {}, "no predictions to score"),
])
def test_bad_inputs_raise_clear_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        caption_metrics(predictions, references)


def test_without_java_falls_back_and_skips_meteor(no_java, caplog):
    with caplog.at_level(logging.WARNING):
        scores = [caption_metrics(p, REFS) for p in (EXACT, MIXED, UNRELATED)]
    assert [r.message for r in caplog.records if "java" in r.message] == [
        "`java` is not on PATH: caption metrics use a pure-Python tokenizer approximating the "
        "PTB tokenizer, and METEOR is skipped"]
    assert all(set(s) == NO_METEOR for s in scores)
    assert scores[0]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    for key in NO_METEOR:
        assert scores[0][key] > scores[1][key] > scores[2][key], key
    with pytest.raises(ValueError, match="meteor=True needs `java` on PATH"):
        caption_metrics(EXACT, REFS, meteor=True)


@needs_java
def test_fallback_scores_equal_java_scores_on_ordinary_captions(monkeypatch):
    with_java = caption_metrics(MIXED, REFS, meteor=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert caption_metrics(MIXED, REFS) == pytest.approx(with_java, rel=1e-12)


@needs_java
def test_python_tokenizer_matches_ptb_on_typical_captions():
    captions = [c for refs in REFS.values() for c in refs] + list(UNRELATED.values()) + [
        "", "Don't go -- now... ok?", "A dog's toy (red) [big] {x}.", "dog’s bed",
        "A “smart” phone — on a table…", 'a black-and-white photo of 3.5 "quoted" `cats`',
        "It's 5 o'clock; a man/woman & kids", "A sign that reads 'STOP'.", "café naïve 日本"]
    assert [metrics._python_tokenize(c) for c in captions] == metrics._ptb_tokenize(captions)


@needs_java
def test_a_dead_meteor_process_raises_instead_of_hanging():
    with pytest.raises(RuntimeError, match="METEOR java process failed.*pass meteor=False"):
        with metrics._meteor_process(True) as scorer:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
            metrics._meteor_score(scorer, {"1": ["a dog"]}, {"1": ["a dog"]})


def test_format_metrics_is_one_short_line():
    line = format_metrics({"BLEU-1": 0.7123, "BLEU-2": 0.5, "BLEU-3": 0.4, "BLEU-4": 0.3011,
                           "ROUGE-L": 0.52, "CIDEr": 0.9131, "METEOR": 0.245, "loss": 2.5})
    assert line == "BLEU-1 0.712 BLEU-4 0.301 METEOR 0.245 ROUGE-L 0.520 CIDEr 0.913 loss 2.500"
    assert format_metrics({"BLEU-1": 1.0, "CIDEr": 3.25}) == "BLEU-1 1.000 CIDEr 3.250"
