"""In-graph CIDEr-D against pycocoevalcap's CiderScorer fed the same document frequencies."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from pycocoevalcap.cider.cider_scorer import CiderScorer

from dist_caption.data.text import END_ID, START_ID
from dist_caption.model import cider

VOCAB = 12  # word ids 4..11; 0 padding, 1-3 the special tokens


class _Documents(list):
    """CiderScorer's references, with `len` the number of training images: CiderScorer takes
    idf's log(N) from len(crefs), and iterates them for the scores."""

    def __init__(self, items, images: int):
        super().__init__(items)
        self.images = images

    def __len__(self):
        return self.images


def reference_scores(candidates, references, df: cider.DocumentFrequencies) -> list[float]:
    """pycocoevalcap's CIDEr-D of word-id captions, with `df` instead of the evaluated set's
    document frequencies (what `compute_score` would count)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    text = lambda ids: " ".join(str(i) for i in ids)
    for candidate, refs in zip(candidates, references):
        scorer.cook_append(text(candidate), [text(r) for r in refs])
    for n in range(1, cider.MAX_N + 1):
        for code, count in zip(df.ids[n - 1].tolist(), df.counts[n - 1].tolist()):
            digits = [(code // VOCAB ** (n - 1 - j)) % VOCAB for j in range(n)]
            scorer.document_frequency[tuple(str(d) for d in digits)] = count
    scorer.crefs = _Documents(scorer.crefs, df.images)
    return scorer.compute_cider()


def random_caption(rng, low=0, high=9) -> list[int]:
    return rng.integers(4, VOCAB, rng.integers(low, high + 1)).tolist()


def padded(rows, length):
    return [r + [0] * (length - len(r)) for r in rows]


def test_in_graph_cider_d_equals_pycocoevalcap_given_the_same_document_frequencies():
    rng = np.random.default_rng(0)
    train = [[random_caption(rng, 3) for _ in range(rng.integers(1, 6))] for _ in range(60)]
    df = cider.document_frequencies(train, VOCAB)
    # Candidates: random, empty, copies of a reference (repeated n-grams), unseen n-grams.
    references = [[random_caption(rng, 2) for _ in range(rng.integers(1, 6))] for _ in range(40)]
    candidates = [random_caption(rng) for _ in range(36)] + [
        [], list(references[37][0]), list(references[38][0]) * 2, [4, 4, 4, 4, 4, 4]]
    want = reference_scores(candidates, references, df)
    refs = [padded(r, 10) + [[0] * 10] * (5 - len(r)) for r in references]
    got = cider.CiderD(df)(tf.constant(padded(candidates, 18)), tf.constant(refs)).numpy()
    assert max(want) > 1.0 and min(want) == 0.0  # the set spans low and high scores
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_words_strip_start_and_end_and_keep_a_padded_prefix():
    tokens = tf.constant([[START_ID, 5, 6, END_ID, 0], [7, 8, END_ID, 0, 0]])
    assert cider.words(tokens).numpy().tolist() == [[5, 6, 0, 0, 0], [7, 8, 0, 0, 0]]


def test_document_frequencies_round_trip(storage):
    df = cider.document_frequencies([[[4, 5], [4, 6]], [[4, 5, 6]]], VOCAB)
    assert df.images == 2
    unigrams = dict(zip(df.ids[0].tolist(), df.counts[0].tolist()))
    assert unigrams == {4: 2, 5: 2, 6: 2}  # per image, not per caption
    path = f"{storage}/df.npz"
    tf.io.gfile.makedirs(storage)
    cider.save(df, path)
    again = cider.load(path)
    assert again.images == 2 and again.vocab_size == VOCAB
    for a, b in zip(df.ids + df.counts, again.ids + again.counts):
        np.testing.assert_array_equal(a, b)


def test_too_large_a_vocabulary_for_exact_ngram_ids_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        cider.document_frequencies([], 60_000)
