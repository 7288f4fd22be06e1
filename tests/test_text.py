"""Text: standardisation (Python and in-graph agree), vocabulary, tokenise/detokenise."""

import numpy as np
import pytest
import tensorflow as tf

from dist_caption.data import text

CORPUS = [
    "A small RED circle, to the left of a blue square.",
    "  trailing   spaces\tand\ttabs  ",
    "Un café près de la fenêtre — très «joli»!",
    "Ein Mann läuft; über die Straße...",
    "emoji 🙂 and symbols $5 + 3% = ok",
    "«»—…",
    "",
    "ÉCOLE",
    "non\u00a0breaking\u2003spaces",
]


def test_python_and_tensorflow_standardisation_agree():
    ours = [text.standardize_py(c) for c in CORPUS]
    graph = [s.decode() for s in text.standardize(tf.constant(CORPUS)).numpy()]
    assert graph == ours
    assert ours[0] == "a small red circle to the left of a blue square"
    assert ours[1] == "trailing spaces and tabs"
    assert ours[2] == "un café près de la fenêtre très joli"
    assert ours[5] == ""
    assert ours[8] == "non breaking spaces"


def test_vocabulary_is_top_k_with_min_count_and_deterministic():
    captions = ["a b c", "a b", "a d", "e"]
    vocab = text.Vocabulary.build(captions, max_size=6, min_count=1)
    assert vocab.tokens == ["", "[UNK]", "[START]", "[END]", "a", "b"]
    assert text.Vocabulary.build(captions, max_size=100, min_count=2).tokens[4:] == ["a", "b"]
    # ties broken alphabetically: c, d and e all appear once
    assert text.Vocabulary.build(captions, max_size=100).tokens[4:] == ["a", "b", "c", "d", "e"]


def test_vocabulary_file_round_trip(tmp_path):
    vocab = text.Vocabulary.build(CORPUS, max_size=50)
    path = tmp_path / "vocab.txt"
    vocab.save(str(path))
    again = text.Vocabulary.load(str(path))
    assert again.tokens == vocab.tokens and again.sha256 == vocab.sha256
    assert path.read_text(encoding="utf-8").splitlines()[1] == "[UNK]"


def test_encode_decode_round_trip_and_unknown_words():
    vocab = text.Vocabulary.build(CORPUS, max_size=50)
    for caption in CORPUS[:5]:
        ids = vocab.encode(caption)
        assert ids[0] == text.START_ID and ids[-1] == text.END_ID
        assert vocab.decode(ids) == text.standardize_py(caption)
    ids = vocab.encode("a zebra")
    assert ids[2] == text.UNK_ID
    assert vocab.decode([text.START_ID, 4, text.END_ID, 5, 6]) == vocab.tokens[4]


def test_in_graph_tokenizer_matches_python_and_detokenizes():
    vocab = text.Vocabulary.build(CORPUS, max_size=50)
    tok = text.TokenizerModule(vocab)
    ids = tok.tokenize(tf.constant(CORPUS[:5]), max_len=16).numpy()
    assert ids.shape == (5, 16)
    for row, caption in zip(ids, CORPUS[:5]):
        want = vocab.encode(caption)[:16]
        np.testing.assert_array_equal(row[:len(want)], want)
        assert not row[len(want):].any()
    back = [s.decode() for s in tok.detokenize(ids).numpy()]
    assert back == [text.standardize_py(c) for c in CORPUS[:5]]


def test_detokenize_stops_at_first_end_and_drops_specials():
    vocab = text.Vocabulary(list(text.SPECIALS) + ["red", "circle"])
    tok = text.TokenizerModule(vocab)
    ids = tf.constant([[4, 5, 3, 4, 4], [2, 1, 4, 0, 0], [3, 4, 5, 0, 0]])
    assert [s.decode() for s in tok.detokenize(ids).numpy()] == ["red circle", "red", ""]


def test_bad_vocabulary_files_are_rejected():
    with pytest.raises(ValueError, match="must start with"):
        text.Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="repeat"):
        text.Vocabulary(list(text.SPECIALS) + ["a", "a"])
