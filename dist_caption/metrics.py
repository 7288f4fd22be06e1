"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr, as the COCO evaluation computes them.

The scorers are pycocoevalcap's, fed the way `pycocoevalcap.eval.COCOEvalCap` feeds them: both
predictions and references go through the Stanford PTB tokenizer (lower case, punctuation tokens
dropped), then Bleu(4), Meteor(), Rouge() and Cider(). SPICE is left out: it downloads Stanford
CoreNLP models at first use, which fails offline, and takes minutes per call.

Java runs the PTB tokenizer and METEOR. Without `java` on PATH a pure-Python tokenizer stands in
(see `_python_tokenize`) and METEOR is skipped, with one warning per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
from typing import Iterator, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

_BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
# The keys `format_metrics` prints first, in this order; BLEU-2/3 add little to a log line.
_HEADLINE = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_METRIC_KEYS = (*_BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr")

_PTB_JAR = os.path.join(os.path.dirname(ptbtokenizer.__file__),
                        ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
_PTB_CMD = ("java", "-cp", _PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase")

# The pure-Python stand-in for the PTB tokenizer: clitics split off as PTB does ("dog's" and
# "dog’s" -> "dog 's", "don't" -> "do n't"), brackets renamed as PTB does (COCO keeps them: its
# punctuation list spells them in upper case, the tokenizer's output is lower case), and every
# token made only of the characters in PTB's punctuation list (plus the quotes and dashes PTB
# maps onto them) dropped. It matches PTB on ordinary captions; "a.m.", "1,000", "?!" and
# "#tag" come out differently.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.&/']\w+)*|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PUNCTUATION_CHARS = frozenset("'`.?!,:;-" "\"“”‘’–—…")


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    meteor: bool | None = None) -> dict[str, float]:
    """Corpus-level COCO caption scores of `predictions` against `references`, keyed by image id.

    Returns "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L" (in [0, 1]) and "CIDEr" (as pycocoevalcap
    returns it, not x100). `meteor=None` computes METEOR when Java is available; `meteor=False`
    skips it (saves ~6 s of JVM start-up per call). Without Java the key is absent.
    """
    return caption_scores(predictions, references, meteor)[0]


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   meteor: bool | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """`caption_metrics` plus each image's own scores: {image id: {"BLEU-4", "METEOR",
    "ROUGE-L", "CIDEr"}} (CIDEr's document frequencies still come from the whole set)."""
    _check_inputs(predictions, references)
    java = shutil.which("java") is not None
    if meteor and not java:
        raise ValueError("meteor=True needs `java` on PATH: install a JRE or pass meteor=False")
    if not java:
        _warn_no_java()
    ids = list(predictions)
    per_image: dict[str, dict] = {i: {} for i in ids}

    def keep(key: str, values) -> None:
        for i, value in zip(ids, values):
            per_image[i][key] = float(value)

    # Start METEOR's JVM first: it loads its paraphrase table while the rest is computed.
    with _meteor_process(java if meteor is None else meteor) as meteor_scorer:
        gts, res = _tokenize(ids, predictions, references, java)
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        scores = dict(zip(_BLEU_KEYS, map(float, bleu)))
        keep("BLEU-4", bleu_each[3])
        if meteor_scorer is not None:
            scores["METEOR"], meteor_each = _meteor_score(meteor_scorer, gts, res)
            keep("METEOR", meteor_each)
        rouge, rouge_each = Rouge().compute_score(gts, res)
        scores["ROUGE-L"] = float(rouge)
        keep("ROUGE-L", rouge_each)
        cider, cider_each = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(cider)
        keep("CIDEr", cider_each)
    return scores, per_image


def format_metrics(metrics: Mapping[str, float]) -> str:
    """One log line: BLEU-1, BLEU-4, METEOR, ROUGE-L, CIDEr (those present), then other keys."""
    keys = [k for k in _HEADLINE if k in metrics]
    keys += [k for k in metrics if k not in _METRIC_KEYS]
    return " ".join(f"{k} {metrics[k]:.3f}" for k in keys)


def _check_inputs(predictions: Mapping[str, str],
                  references: Mapping[str, Sequence[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score: pass at least one image id")
    missing = sorted(set(references) - set(predictions), key=str)
    extra = sorted(set(predictions) - set(references), key=str)
    if missing or extra:
        raise ValueError(
            f"prediction and reference image ids differ: {len(missing)} ids without a "
            f"prediction {missing[:5]}, {len(extra)} without references {extra[:5]}")
    for image_id, refs in references.items():
        if isinstance(refs, str):
            raise ValueError(f"references of image {image_id!r} are a string; pass a list of "
                             "captions")
        if not refs:
            raise ValueError(f"image {image_id!r} has an empty reference list; every image "
                             "needs at least one reference caption")


@functools.cache
def _warn_no_java() -> None:
    logging.warning("`java` is not on PATH: caption metrics use a pure-Python tokenizer "
                    "approximating the PTB tokenizer, and METEOR is skipped")


def _tokenize(ids: list[str], predictions: Mapping[str, str],
              references: Mapping[str, Sequence[str]],
              java: bool) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(gts, res) as pycocoevalcap's scorers take them, from one tokenizer run over both."""
    captions = [predictions[i] for i in ids]
    captions += [ref for i in ids for ref in references[i]]
    tokens = _ptb_tokenize(captions) if java else [_python_tokenize(c) for c in captions]
    res = {i: [tokens[n]] for n, i in enumerate(ids)}
    gts, start = {}, len(ids)
    for i in ids:
        stop = start + len(references[i])
        gts[i], start = tokens[start:stop], stop
    return gts, res


def _ptb_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on a flat list, one JVM for all captions.

    Same jar, flags and punctuation list as `PTBTokenizer.tokenize`, but fed through stdin rather
    than a temporary file inside site-packages (read-only in many containers), and with every
    whitespace run made one space first: the stock wrapper replaces only "\\n", so a caption
    holding "\\r" or U+2028 shifts every later caption onto the wrong image.
    """
    text = "".join(" ".join(c.split()) + "\n" for c in captions)
    result = subprocess.run(_PTB_CMD, input=text.encode("utf-8"), capture_output=True)
    lines = result.stdout.decode("utf-8", errors="replace").split("\n")[:-1]
    if result.returncode != 0 or len(lines) != len(captions):
        raise RuntimeError(f"the PTB tokenizer (java) failed: {len(lines)} lines back for "
                           f"{len(captions)} captions, exit status {result.returncode}: "
                           f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
            for line in lines]


def _python_tokenize(caption: str) -> str:
    """The no-Java stand-in for the PTB tokenizer (rules above `_CLITIC`)."""
    text = _CLITIC.sub(r" \1", caption.lower().replace("’", "'"))
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if not set(t) <= _PUNCTUATION_CHARS)


@contextlib.contextmanager
def _meteor_process(enabled: bool) -> Iterator[Meteor | None]:
    """pycocoevalcap's Meteor (one JVM for the whole call), stopped on the way out."""
    if not enabled:
        yield None
        return
    scorer = Meteor()
    try:
        yield scorer
    finally:
        # Meteor has no close(); its __del__ waits on a lock that compute_score keeps when it
        # fails, and closing stdin raises when the JVM is gone. Stop the JVM here instead.
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.kill()
        with contextlib.suppress(OSError):
            scorer.meteor_p.stdin.close()
        scorer.meteor_p.wait()


def _meteor_score(scorer: Meteor, gts: dict[str, list[str]],
                  res: dict[str, list[str]]) -> tuple[float, list[float]]:
    try:
        score, each = scorer.compute_score(gts, res)
        return float(score), each
    except (OSError, ValueError) as err:
        raise RuntimeError(f"the METEOR java process failed ({err!r}); pass meteor=False to "
                           "skip METEOR") from err
