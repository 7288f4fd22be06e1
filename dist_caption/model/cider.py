"""CIDEr-D in TensorFlow ops, over token ids, with document frequencies fixed in advance.

The reward of self-critical training. pycocoevalcap's `CiderScorer` (which, despite its name,
is CIDEr-D: clipped candidate counts, a Gaussian length penalty with sigma 6, x10) computes the
document frequencies over the set it evaluates; for training, as in ruotianluo's
self-critical.pytorch (`--cached_tokens`), they come from the *training* references instead:
`document_frequencies` counts them once (numpy, at the start of a run), the run saves them
(`save` / `load`, run_dir's `cider_df.npz`), and `CiderD` scores in the graph with them fixed.

An n-gram of word ids (t1..tn) is the integer t1*V^(n-1) + ... + tn (V the vocabulary size), an
exact id (no hashing collisions) while V^4 fits in int64; document frequencies are looked up by
binary search in the sorted ids of each order. Token id 0 is padding: a caption is its ids up
to the first 0, without [START] and [END] (`words` strips them).

    >>> df = document_frequencies([[[5, 6, 7]], [[5, 8]]], vocab_size=10)
    >>> scorer = CiderD(df)
    >>> score = scorer(tf.constant([[5, 6, 7, 0]]), tf.constant([[[5, 6, 7, 0], [5, 8, 0, 0]]]))
    >>> round(float(score[0]), 4)
    3.75
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow as tf

from dist_caption.data.text import END_ID, PAD_ID, START_ID

MAX_N = 4
SIGMA = 6.0


@dataclasses.dataclass(frozen=True)
class DocumentFrequencies:
    """For each n in 1..4, the sorted n-gram ids and how many images' references hold each;
    `images` is the number of images counted (idf is log(images) - log(max(1, df)))."""
    vocab_size: int
    images: int
    ids: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]


def _check_vocab(vocab_size: int) -> None:
    if vocab_size ** MAX_N >= 2 ** 63:
        raise ValueError(f"CIDEr-D's exact n-gram ids need vocab_size**{MAX_N} < 2**63, "
                         f"got vocab_size={vocab_size}")


def _ngram_codes(words: list[int], n: int, vocab_size: int) -> set[int]:
    return {sum(w * vocab_size ** (n - 1 - j) for j, w in enumerate(words[i:i + n]))
            for i in range(len(words) - n + 1)}


def document_frequencies(references, vocab_size: int) -> DocumentFrequencies:
    """Counts, for every 1-4-gram, the images whose references contain it.

    `references` is one list per image of its captions as word ids (no [START]/[END]/padding).
    """
    _check_vocab(vocab_size)
    counts = [dict() for _ in range(MAX_N)]
    images = 0
    for refs in references:
        images += 1
        for n in range(1, MAX_N + 1):
            seen = set().union(*(_ngram_codes(list(r), n, vocab_size) for r in refs))
            for code in seen:
                counts[n - 1][code] = counts[n - 1].get(code, 0) + 1
    ids, values = [], []
    for table in counts:
        keys = np.array(sorted(table), np.int64)
        ids.append(keys)
        values.append(np.array([table[k] for k in keys.tolist()], np.float64))
    return DocumentFrequencies(vocab_size, images, tuple(ids), tuple(values))


def reference_words(references: np.ndarray) -> list[list[int]]:
    """One image's references, token ids [R, T] (0-padded), as the word-id lists `words`
    keeps: no [START], [END] or padding; empty rows dropped."""
    rows = [[int(t) for t in row if t not in (PAD_ID, START_ID, END_ID)] for row in references]
    return [r for r in rows if r]


def save(df: DocumentFrequencies, path: str) -> None:
    """Writes `df` as an .npz file, through tf.io.gfile (the caller makes the write atomic)."""
    arrays = {f"ids{n}": df.ids[n - 1] for n in range(1, MAX_N + 1)}
    arrays.update({f"counts{n}": df.counts[n - 1] for n in range(1, MAX_N + 1)})
    buffer = io.BytesIO()
    np.savez(buffer, vocab_size=df.vocab_size, images=df.images, **arrays)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def load(path: str) -> DocumentFrequencies:
    with tf.io.gfile.GFile(path, "rb") as f, np.load(io.BytesIO(f.read())) as data:
        return DocumentFrequencies(
            int(data["vocab_size"]), int(data["images"]),
            tuple(data[f"ids{n}"] for n in range(1, MAX_N + 1)),
            tuple(data[f"counts{n}"] for n in range(1, MAX_N + 1)))


def words(tokens: tf.Tensor) -> tf.Tensor:
    """Token ids with [START] and [END] replaced by padding: what CIDEr-D compares. Every
    decoder output and cached caption has its words first, so the words stay a 0-padded
    prefix."""
    tokens = tf.cast(tokens, tf.int64)
    special = tf.logical_or(tf.equal(tokens, START_ID), tf.equal(tokens, END_ID))
    kept = tf.where(special, tf.constant(PAD_ID, tf.int64), tokens)
    # [START] leads a cached caption: move the words to the front.
    order = tf.argsort(tf.cast(tf.equal(kept, PAD_ID), tf.int32), axis=-1, stable=True)
    return tf.gather(kept, order, batch_dims=len(tokens.shape) - 1)


class CiderD:
    """CIDEr-D of candidates against references, in TensorFlow ops (no Python per step).

    `__call__(candidates int [B, L], references int [B, R, L']) -> float32 [B]`: word ids,
    0-padded (`words`); a reference row of zeros is absent. Matches pycocoevalcap's
    `CiderScorer.compute_cider` given the same document frequencies (tests/test_cider.py).
    """

    def __init__(self, df: DocumentFrequencies, sigma: float = SIGMA):
        _check_vocab(df.vocab_size)
        self.vocab_size = df.vocab_size
        self.sigma = sigma
        self.log_images = float(np.log(float(max(df.images, 1))))
        self.ids = [tf.constant(np.concatenate([i, [np.iinfo(np.int64).max]])) for i in df.ids]
        self.counts = [tf.constant(np.concatenate([c, [0.0]]), tf.float32) for c in df.counts]

    def _codes(self, w: tf.Tensor, n: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The n-gram ids starting at each position [..., L] and whether they are real."""
        length = tf.shape(w)[-1]
        pad = tf.zeros_like(w[..., :1])
        code = tf.zeros_like(w)
        valid = tf.ones_like(w, tf.bool)
        for j in range(n):
            shifted = tf.concat([w[..., j:]] + [pad] * j, axis=-1)[..., :length]
            code = code * self.vocab_size + shifted
            valid = tf.logical_and(valid, shifted != PAD_ID)
        return code, valid

    def _idf(self, code: tf.Tensor, n: int) -> tf.Tensor:
        flat = tf.reshape(code, [-1])
        index = tf.searchsorted(self.ids[n - 1], flat)
        found = tf.equal(tf.gather(self.ids[n - 1], index), flat)
        df = tf.where(found, tf.gather(self.counts[n - 1], index), 0.0)
        idf = self.log_images - tf.math.log(tf.maximum(df, 1.0))
        return tf.reshape(idf, tf.shape(code))

    @staticmethod
    def _term_freq(code_a, valid_a, code_b, valid_b) -> tf.Tensor:
        """For each position of a [..., La], how often its n-gram occurs in b [..., Lb]."""
        same = tf.logical_and(tf.equal(code_a[..., :, None], code_b[..., None, :]),
                              valid_b[..., None, :])
        return tf.where(valid_a, tf.reduce_sum(tf.cast(same, tf.float32), -1), 0.0)

    def __call__(self, candidates: tf.Tensor, references: tf.Tensor) -> tf.Tensor:
        hyp = tf.cast(candidates, tf.int64)[:, None, :]  # [B, 1, L]
        ref = tf.cast(references, tf.int64)              # [B, R, L']
        present = tf.reduce_any(ref != PAD_ID, axis=-1)  # [B, R]
        # pycocoevalcap's length is the bigram count; the Gaussian penalty compares lengths.
        len_hyp = tf.maximum(tf.reduce_sum(tf.cast(hyp != PAD_ID, tf.float32), -1) - 1, 0.0)
        len_ref = tf.maximum(tf.reduce_sum(tf.cast(ref != PAD_ID, tf.float32), -1) - 1, 0.0)
        penalty = tf.exp(-tf.square(len_hyp - len_ref) / (2 * self.sigma ** 2))  # [B, R]
        total = tf.zeros_like(penalty)
        for n in range(1, MAX_N + 1):
            code_h, valid_h = self._codes(hyp, n)
            code_r, valid_r = self._codes(ref, n)
            idf_h, idf_r = self._idf(code_h, n), self._idf(code_r, n)
            tf_hh = self._term_freq(code_h, valid_h, code_h, valid_h)     # [B, 1, L]
            tf_rr = self._term_freq(code_r, valid_r, code_r, valid_r)     # [B, R, L']
            # Positions of one n-gram share its value: summing over positions counts a
            # distinct n-gram tf times, hence the division by tf.
            norm_h = tf.sqrt(tf.reduce_sum(tf_hh * tf.square(idf_h), -1))  # [B, 1]
            norm_r = tf.sqrt(tf.reduce_sum(tf_rr * tf.square(idf_r), -1))  # [B, R]
            code_hr = tf.broadcast_to(code_h, tf.concat([tf.shape(ref)[:2],
                                                         tf.shape(hyp)[-1:]], 0))
            valid_hr = tf.broadcast_to(valid_h, tf.shape(code_hr))
            tf_hr = self._term_freq(code_hr, valid_hr, code_r, valid_r)   # [B, R, L]
            per_position = tf.math.divide_no_nan(tf.minimum(tf_hh, tf_hr) * tf_hr, tf_hh)
            dot = tf.reduce_sum(per_position * tf.square(idf_h), -1)      # [B, R]
            denominator = norm_h * norm_r
            total += tf.where(denominator > 0, tf.math.divide_no_nan(dot, denominator), dot)
        per_ref = total / MAX_N * penalty
        per_ref = tf.where(present, per_ref, 0.0)
        refs = tf.reduce_sum(tf.cast(present, tf.float32), -1)
        return 10.0 * tf.math.divide_no_nan(tf.reduce_sum(per_ref, -1), refs)
