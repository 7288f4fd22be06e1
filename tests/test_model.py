"""The captioners and in-graph decoding, on tiny configurations (2 x 3 grid: rows != cols)."""

from __future__ import annotations

import dataclasses
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_caption.config import DECODERS
from dist_caption.data.text import BANNED_IDS, END_ID, START_ID, UNK_ID
from dist_caption.model import (
    ModelConfig, beam_search_decode, build_captioner, dropout_seed, greedy_decode,
    recompute_greedy_decode, sample_decode)
from dist_caption.model.layers import DropoutSeeds, HashDropout

VOCAB, GRID, MAX_LEN = 20, (2, 3, 4), 8
ALLOWED = [i for i in range(VOCAB) if i not in BANNED_IDS]


def tiny_config(decoder: str, **overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, feature_shape=GRID, max_len=MAX_LEN, num_layers=2, units=16,
                  num_heads=2, dropout=0.1, encoder_layers=int(decoder == "transformer"))
    return ModelConfig(decoder=decoder, **{**fields, **overrides})


def tiny_model(decoder: str, seed: int = 0, **overrides):
    keras.utils.set_random_seed(seed)
    return build_captioner(tiny_config(decoder, **overrides))


def features(seed: int, batch: int = 3) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(2 * rng.standard_normal((batch, *GRID)), tf.float16)


def tokens(seed: int, batch: int = 3, length: int = MAX_LEN - 1) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(END_ID + 1, VOCAB, (batch, length)), tf.int32)


def logits_of(model, feats, toks, training=False, seed=0) -> tf.Tensor:
    return model({"features": feats, "tokens": toks}, training=training,
                 seed=dropout_seed(seed) if training else None)


@pytest.fixture
def reset_policy():
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_and_dtypes(decoder):
    model = tiny_model(decoder)
    feats = features(0)
    logits = logits_of(model, feats, tokens(0))
    assert (logits.shape, logits.dtype) == ((3, MAX_LEN - 1, VOCAB), tf.float32)

    memory = model.encode(feats)
    step_logits, _, attention = model.decode_step(
        tf.fill([3], START_ID), 0, memory, model.initial_state(memory, 3))
    assert (step_logits.shape, step_logits.dtype) == ((3, VOCAB), tf.float32)
    assert (attention.shape, attention.dtype) == ((3, 2 * 3), tf.float32)
    np.testing.assert_allclose(tf.reduce_sum(attention, -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_image_index_encodes_each_image_once_with_the_same_result(decoder):
    """An image-major batch (--captions_per_image) gives the logits and gradients of the same
    captions with their images' features repeated, to float32 rounding."""
    model = tiny_model(decoder, dropout=0.0)
    feats, toks = features(2, batch=2), tokens(2, batch=5)
    index = tf.constant([0, 0, 1, 1, 1])

    def loss_and_grads(inputs):
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)
            loss = tf.reduce_sum(tf.nn.log_softmax(logits)[..., END_ID + 1:] ** 2)
        return logits, tape.gradient(loss, model.trainable_variables)

    shared, shared_grads = loss_and_grads({"features": feats, "tokens": toks,
                                           "image_index": index})
    repeated, repeated_grads = loss_and_grads({"features": tf.gather(feats, index),
                                               "tokens": toks})
    np.testing.assert_allclose(shared, repeated, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, repeated_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_causal(decoder):
    model = tiny_model(decoder)
    feats, toks = features(1), tokens(1).numpy()
    changed = toks.copy()
    changed[:, 4] = np.where(changed[:, 4] == 4, 5, 4)
    before, after = logits_of(model, feats, toks), logits_of(model, feats, changed)
    np.testing.assert_allclose(before[:, :4], after[:, :4], atol=1e-6, rtol=0)
    assert np.abs(before[:, 4:] - after[:, 4:]).max() > 1e-3


def test_grid_position_embedding_tells_left_from_right():
    model = tiny_model("transformer")
    feats, toks = features(2), tokens(2)
    mirrored = tf.reverse(feats, axis=[2])
    assert np.abs(logits_of(model, feats, toks) - logits_of(model, mirrored, toks)).max() > 1e-3
    # Without the column embedding attention cannot see the mirroring: the control.
    cols = model.grid_positions.col_embedding
    cols.assign(tf.zeros_like(cols))
    np.testing.assert_allclose(logits_of(model, feats, toks), logits_of(model, mirrored, toks),
                               atol=1e-5, rtol=0)


def test_output_bias_is_log_frequency_and_banned_ids_stay_banned():
    counts = np.random.default_rng(0).integers(0, 1000, VOCAB)
    model = build_captioner(tiny_config("transformer"), token_counts=counts)
    bias = model.logits_layer.dense.bias.numpy()
    offset = bias[ALLOWED] - np.log(counts[ALLOWED] + 1)
    np.testing.assert_allclose(offset, offset[0], atol=1e-5)

    feats, toks = features(3), tokens(3)
    optimizer = keras.optimizers.Adam(0.1)
    for _ in range(3):
        with tf.GradientTape() as tape:
            logits = logits_of(model, feats, toks, training=True)
            # Every target is [START]: the strongest possible push towards a banned id.
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.fill(toks.shape, START_ID), logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
    assert model.logits_layer.dense.bias.numpy()[START_ID] > bias[START_ID]
    probs = tf.nn.softmax(logits_of(model, feats, toks)).numpy()
    assert probs[..., list(BANNED_IDS)].max() == 0.0


def test_token_counts_must_match_the_vocabulary():
    with pytest.raises(ValueError, match="token_counts must be 20 non-negative counts"):
        build_captioner(tiny_config("transformer"), token_counts=np.ones(19))


@pytest.mark.parametrize("field, value, message", [
    ("decoder", "lstm", "decoder must be one of"),
    ("vocab_size", 4, "vocab_size must be more than"),
    ("feature_shape", (7, 7), "feature_shape must be three positive sizes"),
    ("max_len", 2, "max_len must be at least 3, got 2"),
    ("num_heads", 3, r"num_heads must divide units \(got units=16, num_heads=3\)"),
    ("stem_channels", 6, "stem_channels must be a positive multiple of 4, got 6"),
    ("stem", "auto", "stem must be one of"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("stem", "conv", "stem 'conv' needs a grid of raw RGB pixel patches"),
])
def test_config_errors(field, value, message):
    config = dataclasses.replace(tiny_config("transformer"), **{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_step_matches_teacher_forced_call(decoder):
    model = tiny_model(decoder)
    feats, toks = features(4), tokens(4)
    memory = model.encode(feats)
    state = model.initial_state(memory, 3)
    stepped = []
    for step in range(MAX_LEN - 1):
        step_logits, state, _ = model.decode_step(toks[:, step], step, memory, state)
        stepped.append(step_logits)
    np.testing.assert_allclose(tf.stack(stepped, 1).numpy()[..., ALLOWED],
                               logits_of(model, feats, toks).numpy()[..., ALLOWED],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decoder", DECODERS)
def test_cached_greedy_equals_recompute(decoder, seed):
    model = tiny_model(decoder, seed)
    feats = features(seed, batch=6)
    cached = greedy_decode(model, feats, MAX_LEN - 1)
    recomputed = recompute_greedy_decode(model, feats, MAX_LEN - 1)
    np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
    np.testing.assert_array_equal(cached["length"], recomputed["length"])
    np.testing.assert_allclose(cached["log_prob"], recomputed["log_prob"], atol=1e-5, rtol=0)


def _reference_greedy(model, feats, max_len: int):
    """Greedy decoding spelled out: the full model on [START] + the tokens so far, numpy's
    argmax of the last position's logits, each caption until its [END] or `max_len` tokens."""
    batch = feats.shape[0]
    prefix = np.full([batch, 1], START_ID, np.int32)
    tokens, length = np.zeros([batch, max_len], np.int32), np.zeros([batch], np.int32)
    log_prob, done = np.zeros([batch], np.float64), np.zeros([batch], bool)
    for step in range(max_len):
        last = logits_of(model, feats, prefix).numpy()[:, -1].astype(np.float64)
        token = last.argmax(-1)
        top = last.max(-1)
        picked = last[np.arange(batch), token] - top - np.log(np.exp(last - top[:, None]).sum(-1))
        for i in np.flatnonzero(~done):
            tokens[i, step], length[i], log_prob[i] = token[i], step + 1, log_prob[i] + picked[i]
        done |= token == END_ID
        prefix = np.concatenate([prefix, token[:, None].astype(np.int32)], 1)
        if done.all():
            break
    return tokens, length, log_prob


def test_recompute_greedy_decode_runs_in_a_graph():
    model = tiny_model("transformer")
    feats = features(1, batch=6)  # the fourth caption is [END] alone: its row stays 0 after it
    graph = tf.function(recompute_greedy_decode)(model, feats, MAX_LEN - 1)
    tokens, length, log_prob = _reference_greedy(model, feats, MAX_LEN - 1)
    np.testing.assert_array_equal(graph["tokens"], tokens)
    np.testing.assert_array_equal(graph["length"], length)
    np.testing.assert_allclose(graph["log_prob"], log_prob, atol=1e-4, rtol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_decode_compiles_with_xla(decoder):
    model = tiny_model(decoder)
    feats = features(6)
    eager = greedy_decode(model, feats, MAX_LEN - 1)
    for compiled in (tf.function(greedy_decode), tf.function(greedy_decode, jit_compile=True)):
        result = compiled(model, feats, MAX_LEN - 1)
        np.testing.assert_array_equal(result["tokens"], eager["tokens"])
        np.testing.assert_array_equal(result["length"], eager["length"])
        for key in ("log_prob", "attention"):
            np.testing.assert_allclose(result[key], eager[key], atol=1e-5, rtol=0)


def _sequence_log_prob(model, feats, tokens, length) -> np.ndarray:
    """Teacher-forced log-probability of each decoded caption, from the full model."""
    start = np.full([tokens.shape[0], 1], START_ID)
    log_probs = tf.nn.log_softmax(logits_of(model, feats, np.concatenate([start, tokens], 1)))
    picked = np.take_along_axis(log_probs.numpy()[:, :-1], tokens[..., None], -1)[..., 0]
    return (picked * (np.arange(tokens.shape[1]) < length[:, None])).sum(1)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_width_one_is_greedy(decoder):
    model = tiny_model(decoder, seed=3)
    feats = features(3, batch=5)
    greedy = greedy_decode(model, feats, MAX_LEN - 1)
    beam = tf.function(beam_search_decode)(model, feats, MAX_LEN - 1, tf.constant(1))
    np.testing.assert_array_equal(beam["tokens"][:, 0], greedy["tokens"])
    np.testing.assert_array_equal(beam["length"][:, 0], greedy["length"])
    np.testing.assert_allclose(beam["log_prob"][:, 0], greedy["log_prob"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_finds_captions_at_least_as_likely_as_greedy(decoder):
    model = tiny_model(decoder, seed=4)
    feats = features(4, batch=6)
    greedy = greedy_decode(model, feats, MAX_LEN - 1)
    beam = beam_search_decode(model, feats, MAX_LEN - 1, 4)
    scores = beam["log_prob"].numpy()
    assert (scores[:, 0] >= greedy["log_prob"].numpy() - 1e-5).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "beams must come best first"
    # Every beam's score is its caption's probability under the model, and beams are distinct.
    tokens, length = beam["tokens"].numpy(), beam["length"].numpy()
    for k in range(4):
        np.testing.assert_allclose(
            _sequence_log_prob(model, feats, tokens[:, k], length[:, k]), scores[:, k],
            atol=1e-4, rtol=0)
        ended = tokens[:, k][np.arange(6), length[:, k] - 1] == END_ID
        assert (ended | (length[:, k] == MAX_LEN - 1)).all()
    for row in tokens:
        assert len({tuple(beam) for beam in row}) == 4


def test_beam_search_length_penalty_ranks_by_log_prob_per_length_power():
    model = tiny_model("transformer", seed=4)
    feats = features(4, batch=6)
    plain = beam_search_decode(model, feats, MAX_LEN - 1, 4)
    penalised = beam_search_decode(model, feats, MAX_LEN - 1, 4, length_penalty=1.0)
    ranked = (penalised["log_prob"] / tf.cast(penalised["length"], tf.float32)).numpy()
    assert (np.diff(ranked, axis=1) <= 1e-6).all(), "beams must come best per token first"
    # The same beams, reordered: the per-caption scores are a permutation of the plain ones.
    np.testing.assert_allclose(np.sort(penalised["log_prob"].numpy(), 1),
                               np.sort(plain["log_prob"].numpy(), 1), atol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_is_reproducible_per_seed_and_greedy_when_cold(decoder):
    model = tiny_model(decoder, seed=5)
    feats = features(5, batch=6)
    sample = tf.function(sample_decode)
    first = sample(model, feats, MAX_LEN - 1, tf.constant(1.0), tf.constant(7, tf.int64))
    again = sample(model, feats, MAX_LEN - 1, tf.constant(1.0), tf.constant(7, tf.int64))
    other = sample(model, feats, MAX_LEN - 1, tf.constant(1.0), tf.constant(8, tf.int64))
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    assert not np.array_equal(first["tokens"], other["tokens"])
    tokens, length = first["tokens"].numpy(), first["length"].numpy()
    np.testing.assert_allclose(_sequence_log_prob(model, feats, tokens, length),
                               first["log_prob"], atol=1e-4, rtol=0)
    cold = sample(model, feats, MAX_LEN - 1, tf.constant(1e-4), tf.constant(7, tf.int64))
    np.testing.assert_array_equal(cold["tokens"],
                                  greedy_decode(model, feats, MAX_LEN - 1)["tokens"])


class ScriptedModel:
    """Emits 4, 5, 6, ... and [END] at a chosen step per caption; counts its decode steps."""

    config = types.SimpleNamespace(max_len=6)
    grid_size = 2

    def __init__(self, end_steps):
        self.end_steps = tf.constant(end_steps)
        self.steps_run = 0

    def encode(self, features):
        return ()

    def initial_state(self, memory, batch):
        return tf.zeros([batch])

    def decode_step(self, token, step, memory, state):
        self.steps_run += 1
        chosen = tf.where(self.end_steps == step, END_ID, END_ID + 1 + step)
        logits = 5.0 * tf.one_hot(chosen, VOCAB)
        return logits, state, tf.fill([len(self.end_steps), self.grid_size], 0.5)


def test_greedy_decode_stops_early_and_pads_after_end():
    model = ScriptedModel(end_steps=[1, 3, 0])
    result = greedy_decode(model, tf.zeros([3, 1]), max_len=6)
    np.testing.assert_array_equal(result["tokens"], [[4, END_ID, 0, 0, 0, 0],
                                                     [4, 5, 6, END_ID, 0, 0],
                                                     [END_ID, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(result["length"], [2, 4, 1])
    assert model.steps_run == 4
    alive = np.arange(6)[None, :] < np.array([[2], [4], [1]])
    np.testing.assert_array_equal(result["attention"], 0.5 * alive[:, :, None] * np.ones(2))
    step_log_prob = float(tf.nn.log_softmax(5.0 * tf.one_hot(4, VOCAB))[4])
    np.testing.assert_allclose(result["log_prob"], step_log_prob * np.array([2, 4, 1]),
                               rtol=1e-6)


def test_decode_max_len_is_bounded_by_the_model():
    with pytest.raises(ValueError, match="max_len must be between 1 and the model's max_len"):
        greedy_decode(tiny_model("gru_attention"), features(0), MAX_LEN + 1)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_mixed_precision(decoder, policy, reset_policy):
    keras.mixed_precision.set_global_policy(policy)
    model = tiny_model(decoder)
    logits = logits_of(model, features(7), tokens(7)).numpy()
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits[..., list(BANNED_IDS)], -1e9)
    decoded = greedy_decode(model, features(7), MAX_LEN - 1)
    assert np.isfinite(decoded["log_prob"]).all()
    assert not np.isin(decoded["tokens"], [UNK_ID, START_ID]).any()


def test_hash_dropout_masks_are_the_same_compiled_or_not_and_differ_by_seed_and_site():
    drop = HashDropout(0.3)
    x = tf.ones([64, 23, 32])

    def masks(seed):  # two call sites, as in a block
        seeds = DropoutSeeds(dropout_seed(seed))
        return drop(x, seeds=seeds, training=True), drop(x, seeds=seeds, training=True)

    plain = masks(5)
    compiled = tf.function(masks, jit_compile=True)(tf.constant(5))
    for a, b in zip(plain, compiled):
        np.testing.assert_array_equal(a, b)
    kept = [(m.numpy() > 0) for m in plain]
    assert abs(kept[0].mean() - 0.7) < 0.01 and abs(kept[1].mean() - 0.7) < 0.01
    np.testing.assert_allclose(plain[0].numpy().max(), 1 / 0.7, rtol=1e-6)
    assert (kept[0] != kept[1]).mean() > 0.3, "two sites drew the same mask"
    assert (kept[0] != (masks(6)[0].numpy() > 0)).mean() > 0.3, "seeds 5 and 6 drew the same"
    # Independent per element: neighbours along every axis agree no more than chance.
    for axis in range(3):
        a, b = np.moveaxis(kept[0], axis, 0)[:-1], np.moveaxis(kept[0], axis, 0)[1:]
        assert abs((a == b).mean() - (0.7 ** 2 + 0.3 ** 2)) < 0.02


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.setting("dropout")
def test_dropout_is_a_function_of_the_seed(decoder):
    model = tiny_model(decoder, dropout=0.3)
    feats, toks = features(4), tokens(4)
    first, again = (logits_of(model, feats, toks, training=True, seed=1) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = logits_of(model, feats, toks, training=True, seed=2)
    assert np.abs(first - other).max() > 1e-3
    assert np.abs(first - logits_of(model, feats, toks)).max() > 1e-3, "no dropout"
    with pytest.raises(ValueError, match="training with dropout needs seeds"):
        model({"features": feats, "tokens": toks}, training=True)


@pytest.mark.parametrize("decoder", DECODERS)
def test_xla_train_step_reaches_every_weight(decoder):
    model = tiny_model(decoder)
    feats, toks = features(8), tokens(8, length=MAX_LEN)
    optimizer = keras.optimizers.Adam(1e-2)

    @tf.function(jit_compile=True)
    def loss_and_gradients():
        with tf.GradientTape() as tape:
            logits = logits_of(model, feats, toks[:, :-1], training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                toks[:, 1:], logits))
        return loss, tape.gradient(loss, model.trainable_variables)

    losses = []
    for _ in range(3):
        loss, gradients = loss_and_gradients()
        assert all(g is not None and np.isfinite(tf.convert_to_tensor(g)).all()
                   for g in gradients)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_config_saved_as_json_rebuilds_the_same_model(decoder, tmp_path):
    """What evaluation and export rely on: run.json's config rebuilds, through
    `build_captioner`, a model that takes every weight of the trained one."""
    import json

    trained = tiny_model(decoder, seed=0)
    saved = json.loads(json.dumps(dataclasses.asdict(trained.config)))
    keras.utils.set_random_seed(1)
    rebuilt = build_captioner(ModelConfig.from_dict(saved))
    assert rebuilt.config == trained.config
    path = tf.train.Checkpoint(model=trained).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=rebuilt).restore(path).assert_consumed()
    feats, toks = features(5), tokens(5)
    np.testing.assert_array_equal(logits_of(rebuilt, feats, toks), logits_of(trained, feats, toks))


@pytest.mark.parametrize("decoder", DECODERS)
def test_checkpoint_round_trip_restores_every_weight(decoder, tmp_path):
    trained, fresh = tiny_model(decoder, seed=0), tiny_model(decoder, seed=1)
    path = tf.train.Checkpoint(model=trained).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(trained.weights)
    tf.train.Checkpoint(model=fresh).restore(path).assert_consumed()
    feats, toks = features(9), tokens(9)
    np.testing.assert_array_equal(logits_of(fresh, feats, toks), logits_of(trained, feats, toks))


# A 2 x 3 grid of 4 x 4 RGB pixel patches: what the conv stem reads.
PIXEL_GRID = (2, 3, 48)


def test_pixel_stem_reads_the_patches_backbone_grid_as_its_image():
    from dist_caption.data.backbones import Patches
    from dist_caption.model.layers import PixelStem

    image = tf.random.uniform([2, 8, 12, 3], seed=0)
    stem = PixelStem(patch=4, channels=8)
    np.testing.assert_array_equal(stem.image(Patches(4)(image)), image)
    # One pixel changed in one cell changes the stem's output in the cells around it too.
    changed = image.numpy()
    changed[0, 3, 3] += 1.0
    before, after = stem(Patches(4)(image)), stem(Patches(4)(changed))
    moved = np.abs(before - after).max(axis=-1)[0] > 1e-6
    assert moved[0, 0] and moved[1, 1] and not moved[:, 2].any()
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.setting("stem")
def test_conv_stem_captioner_steps_like_its_teacher_forced_call(decoder):
    model = tiny_model(decoder, feature_shape=PIXEL_GRID, stem="conv", stem_channels=8)
    rng = np.random.default_rng(10)
    feats = tf.constant(rng.uniform(size=(3, *PIXEL_GRID)), tf.float16)
    toks = tokens(10)
    memory = model.encode(feats)
    state = model.initial_state(memory, 3)
    stepped = []
    for step in range(MAX_LEN - 1):
        step_logits, state, attention = model.decode_step(toks[:, step], step, memory, state)
        stepped.append(step_logits)
    assert attention.shape == (3, 2 * 3)
    np.testing.assert_allclose(tf.stack(stepped, 1).numpy()[..., ALLOWED],
                               logits_of(model, feats, toks).numpy()[..., ALLOWED],
                               atol=1e-5, rtol=0)
    stem_weights = [w for w in model.trainable_weights if "conv2d" in w.path]
    assert len(stem_weights) == 8  # 4 convolutions, kernel and bias each


def _constrained_by_hand(logits, step, tokens, controls):
    """`decoding.constrain`, word by word in Python: the reference."""
    out = logits.copy()
    for i in range(len(out)):
        caption = [int(t) for t in tokens[i, :step]]
        penalty = controls["repetition_penalty"][i]
        for w in set(caption):
            out[i, w] = out[i, w] / penalty if out[i, w] > 0 else out[i, w] * penalty
        n = controls["no_repeat_ngram"][i]
        if n >= 1:
            last = tuple(caption[len(caption) - n + 1:]) if n > 1 else ()
            for s in range(step - n + 1):
                if tuple(caption[s:s + n - 1]) == last:
                    out[i, caption[s + n - 1]] = -1e9
        if step < controls["min_length"][i]:
            out[i, END_ID] = -1e9
        if 0 < controls["max_length"][i] <= step:
            end = out[i, END_ID]
            out[i, :] = -1e9
            out[i, END_ID] = end
    return out


def test_constrain_equals_a_reference_by_hand_and_is_exact_when_neutral():
    """Repetition penalty, n-gram blocking, minimum and maximum length on random captions and
    logits, every step: equal to the word-by-word reference; with the contract's defaults the
    logits come back bit for bit (so a default request captions as before)."""
    from dist_caption.model import decoding

    rng = np.random.default_rng(0)
    vocab, length, rows = 9, 10, 64
    for step in range(length):
        tokens = rng.integers(4, 8, size=(rows, length)).astype(np.int32)
        tokens[:, step:] = 0
        logits = (rng.normal(size=(rows, vocab)) * 3).astype(np.float32)
        controls = {"repetition_penalty": rng.choice([1.0, 1.5, 3.0], rows).astype(np.float32),
                    "no_repeat_ngram": rng.integers(0, 5, rows).astype(np.int32),
                    "min_length": rng.integers(0, length, rows).astype(np.int32),
                    "max_length": rng.integers(0, length, rows).astype(np.int32)}
        got = decoding.constrain(tf.constant(logits), tf.constant(step), tf.constant(tokens),
                                 {k: tf.constant(v) for k, v in controls.items()})
        np.testing.assert_array_equal(got.numpy(), _constrained_by_hand(
            logits, step, tokens, controls))
        neutral = {k: tf.fill([rows], v) for k, v in decoding.NEUTRAL_CONTROLS.items()}
        np.testing.assert_array_equal(decoding.constrain(
            tf.constant(logits), tf.constant(step), tf.constant(tokens), neutral).numpy(), logits)
