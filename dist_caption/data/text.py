"""Caption text: standardisation, the vocabulary, tokenisation and detokenisation.

Two implementations of standardisation that agree (a test checks it): `standardize_py` for
building the vocabulary and the cache, and `standardize` with core TensorFlow string ops, so the
same rule can run inside a SavedModel. Token ids are fixed for the specials:

    0 ''  (padding)    1 '[UNK]'    2 '[START]'    3 '[END]'

The vocabulary is a plain-text file, one token per line, line number = id.
"""

from __future__ import annotations

import collections
import hashlib
import unicodedata
from typing import Iterable, Sequence

from dist_caption.config import BANNED_IDS, END_ID, PAD_ID, START_ID, UNK_ID  # noqa: F401
from dist_caption.files import read_text, write_atomic

PAD, UNK, START, END = "", "[UNK]", "[START]", "[END]"
SPECIALS = (PAD, UNK, START, END)
# Their ids (PAD_ID, UNK_ID, START_ID, END_ID) and the ones the decoder must never produce
# (BANNED_IDS) are declared in config.py.

# RE2 patterns for the in-graph version: punctuation and symbols are removed, any run of
# whitespace (ASCII or Unicode separators) becomes one space.
_TF_PUNCT = r"[\p{P}\p{S}]"
_TF_SPACE = r"[\s\p{Z}]+"


def standardize_py(caption: str) -> str:
    """Lower case, punctuation and symbols removed, whitespace collapsed."""
    kept = "".join(ch for ch in caption.lower()
                   if unicodedata.category(ch)[0] not in "PS")
    return " ".join(kept.split())


def standardize(captions):
    """The in-graph twin of `standardize_py` for a tf.string tensor of any shape."""
    import tensorflow as tf

    text = tf.strings.lower(captions, encoding="utf-8")
    text = tf.strings.regex_replace(text, _TF_PUNCT, "")
    text = tf.strings.regex_replace(text, _TF_SPACE, " ")
    return tf.strings.strip(text)


class Vocabulary:
    """A fixed list of tokens with the four specials first.

    >>> vocab = Vocabulary.build(["A red circle.", "a blue square"], max_size=10, min_count=1)
    >>> vocab.tokens[4:]  # by count, then alphabetically
    ['a', 'blue', 'circle', 'red', 'square']
    >>> vocab.encode("a red square")
    [2, 4, 7, 8, 3]
    >>> vocab.decode([2, 4, 7, 8, 3, 0])
    'a red square'
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat a token")
        self.tokens = tokens
        self._ids = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], max_size: int, min_count: int = 1) -> "Vocabulary":
        """Top `max_size` tokens (specials included) seen at least `min_count` times.

        Ties in frequency are broken alphabetically, so the result is deterministic.
        """
        counts = collections.Counter()
        for caption in captions:
            counts.update(standardize_py(caption).split())
        ranked = sorted((t for t, c in counts.items() if c >= min_count),
                        key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + ranked[:max(0, max_size - len(SPECIALS))])

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        return cls(read_text(path).split("\n")[:-1])

    def save(self, path: str) -> None:
        """Writes the file atomically (temporary name, then rename)."""
        write_atomic(path, "".join(f"{t}\n" for t in self.tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()

    def encode(self, caption: str) -> list[int]:
        """[START] + token ids of the standardised caption + [END]."""
        words = standardize_py(caption).split()
        return [START_ID] + [self._ids.get(w, UNK_ID) for w in words] + [END_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first [END]; specials are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i >= len(SPECIALS):
                words.append(self.tokens[i])
        return " ".join(words)


class TokenizerModule:
    """Tokenisation and detokenisation with core TensorFlow ops, for use inside a SavedModel.

    Built from a `Vocabulary`; the lookup table is created here, so a `tf.Module` that keeps
    this object as an attribute tracks the table and exports it with the model.
    """

    def __init__(self, vocab: Vocabulary):
        import tensorflow as tf

        self.vocab_size = len(vocab)
        self.tokens = tf.constant(vocab.tokens, dtype=tf.string)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                self.tokens, tf.range(self.vocab_size, dtype=tf.int64)),
            default_value=UNK_ID)

    def tokenize(self, captions, max_len: int):
        """tf.string [batch] -> int64 [batch, max_len]: [START] words [END], padded, truncated."""
        import tensorflow as tf

        words = tf.strings.split(standardize(captions))
        ids = self.table.lookup(words)
        batch = ids.nrows()
        start = tf.fill([batch, 1], tf.constant(START_ID, tf.int64))
        end = tf.fill([batch, 1], tf.constant(END_ID, tf.int64))
        ids = tf.concat([start, ids, end], axis=1)
        return ids.to_tensor(default_value=PAD_ID, shape=[None, max_len])

    def detokenize(self, ids):
        """int [batch, len] -> tf.string [batch]: words before the first [END], specials dropped."""
        import tensorflow as tf

        ids = tf.cast(ids, tf.int64)
        ended = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int64), axis=1) > 0
        keep = tf.logical_and(tf.logical_not(ended), ids >= len(SPECIALS))
        words = tf.ragged.boolean_mask(tf.gather(self.tokens, ids), keep)
        return tf.strings.reduce_join(words, axis=1, separator=" ")
