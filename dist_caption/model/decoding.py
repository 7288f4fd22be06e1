"""In-graph decoding: `tf.while_loop`s that stop once every caption has ended.

`greedy_decode` feeds one token at a time through `Captioner.decode_step` (image work once,
key/value cache, static shapes: it compiles with XLA); `sample_decode` does the same but draws
each token from the temperature-scaled distribution; `beam_search_decode` keeps the `beam_width`
best prefixes per image, reordering the key/value cache as beams are reborn.
`recompute_greedy_decode` re-runs the whole model on the growing prefix at every step, as the
tutorials do: the benchmark baseline and the reference the tests compare with.

Greedy and sampling return a dict:
    tokens    int32 [B, max_len]  the tokens after [START], [END] included, 0 after it
    length    int32 [B]           tokens up to and including [END] (max_len if none)
    log_prob  float32 [B]         sum of the model's log-probabilities of those tokens
and `greedy_decode` / `sample_decode` also `attention` float32 [B, max_len, H*W] (0 after [END]).
Beam search returns the same keys with a beam axis after the batch axis, best beam first.

Greedy decoding and beam search take optional per-image `controls` (`constrain`): a caption
length range, n-gram blocking and a repetition penalty, applied to the logits in-graph before
each choice; their neutral values leave the logits, and so the captions, bit for bit unchanged.
`log_prob` is then under the constrained distribution the caption was chosen from.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from dist_caption.data.text import END_ID, PAD_ID, START_ID
from dist_caption.model.captioner import Captioner
from serving import contract

# (step, last token [B], tokens so far [B, max_len], carry) -> (logits [B, V], carry, attention)
StepFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, object], tuple[tf.Tensor, object, tf.Tensor]]
# (logits [B, V] float32, step) -> the next token [B] int32
ChooseFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
NEG_INF = -1e9


# The per-image decoding controls (each [B]) and their neutral values: the serving contract's
# defaults of the signatures' optional inputs.
NEUTRAL_CONTROLS = {name: contract.DEFAULTS[name] for name in contract.CONTROLS}


def constrain(logits: tf.Tensor, step: tf.Tensor, tokens: tf.Tensor,
              controls: dict[str, tf.Tensor]) -> tf.Tensor:
    """`logits` [N, V] for the token at `step`, after `tokens` [N, L] (positions < `step` hold
    the caption so far), under `controls` (each [N]):

    - `repetition_penalty` r >= 1: a word already in the caption has its logit divided by r
      when positive, multiplied by r when not (CTRL, Keskar et al. 2019); 1 is off;
    - `no_repeat_ngram` n >= 1: a word that would repeat an n-gram of the caption is banned
      (self-critical.pytorch's `--block_trigrams` is n = 3; n = 1 bans every repeated word);
      0 is off;
    - `min_length` m: [END] is banned before m words;
    - `max_length` M > 0: after M words only [END] may follow; 0 is the model's own limit.

    Static shapes only (it compiles with XLA); with every control neutral the result equals
    `logits` exactly.
    """
    vocab, length = logits.shape[-1], tokens.shape[-1]
    neg_inf = tf.constant(NEG_INF, logits.dtype)
    pos = tf.range(length)
    rows = tf.shape(tokens)[0]

    def words_where(ids, mask):
        """[N, V]: whether row n has ids[n, j] for some j where mask[n, j] (a scatter, not a
        one-hot of [N, L, V]: this runs at every step of every request)."""
        row = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(ids))
        hits = tf.scatter_nd(tf.stack([row, ids], axis=-1), tf.cast(mask, tf.int32),
                             tf.stack([rows, vocab]))
        return hits > 0

    seen = words_where(tokens, tf.broadcast_to(pos[None, :] < step, tf.shape(tokens)))
    penalty = tf.cast(controls["repetition_penalty"], logits.dtype)[:, None]
    logits = tf.where(seen, tf.where(logits > 0, logits / penalty, logits * penalty), logits)

    # n-gram blocking: the n-gram starting at s (for every s whose n-gram is complete) matches
    # when its first n-1 words equal the caption's last n-1; its last word is then banned.
    n = tf.cast(controls["no_repeat_ngram"], tf.int32)[:, None]  # [N, 1]
    offsets = tf.range(length)
    windows = tf.gather(tokens, tf.minimum(pos[:, None] + offsets[None, :], length - 1),
                        axis=1)  # [N, s, k]: the word at s + k
    last = tf.gather(tokens, tf.clip_by_value(step - n + 1 + offsets[None, :], 0, length - 1),
                     batch_dims=1)  # [N, k]: the caption's last n-1 words
    compared = offsets[None, :] < n - 1  # [N, k]
    same = tf.reduce_all(tf.logical_or(tf.equal(windows, last[:, None, :]),
                                       tf.logical_not(compared[:, None, :])), axis=2)
    complete = tf.logical_and(pos[None, :] + n - 1 < step, n >= 1)  # [N, s]
    following = tf.gather(tokens, tf.clip_by_value(pos[None, :] + n - 1, 0, length - 1),
                          batch_dims=1)
    blocked = words_where(following, tf.logical_and(same, complete))

    is_end = tf.equal(tf.range(vocab), END_ID)[None, :]  # [1, V]
    too_short = (step < tf.cast(controls["min_length"], tf.int32))[:, None]
    max_length = tf.cast(controls["max_length"], tf.int32)[:, None]
    too_long = tf.logical_and(max_length > 0, step >= max_length)
    banned = tf.logical_or(tf.logical_and(blocked, tf.logical_not(is_end)),
                           tf.logical_and(too_short, is_end))
    banned = tf.logical_or(banned, tf.logical_and(too_long, tf.logical_not(is_end)))
    return tf.where(banned, neg_inf, logits)


def _broadcast_controls(controls: dict | None, rows: tf.Tensor, repeat=None) -> dict | None:
    """`controls` (scalars or [B]) as [rows] tensors (each row repeated `repeat` times first)."""
    if controls is None:
        return None
    out = {}
    for name, neutral in NEUTRAL_CONTROLS.items():
        value = tf.convert_to_tensor(controls.get(name, neutral),
                                     tf.float32 if isinstance(neutral, float) else tf.int32)
        if repeat is not None and value.shape.rank != 0:  # one per image: one per beam
            value = tf.repeat(tf.reshape(value, [-1]), repeat)
        out[name] = tf.broadcast_to(value, [rows])
    return out


def _argmax(logits: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def _decode_loop(step_fn: StepFn, carry, batch: tf.Tensor, max_len: int,
                 attention_size: int, choose: ChooseFn = _argmax,
                 controls: dict | None = None) -> dict[str, tf.Tensor]:
    def not_finished(step, token, done, *_):
        return tf.logical_and(step < max_len, tf.logical_not(tf.reduce_all(done)))

    def body(step, token, done, carry, tokens, attention, log_prob, length):
        logits, carry, weights = step_fn(step, token, tokens, carry)
        if controls is not None:
            logits = constrain(logits, step, tokens, controls)
        token = tf.where(done, 0, choose(logits, step))
        token_log_prob = tf.gather(tf.nn.log_softmax(logits), token, batch_dims=1)
        live = tf.logical_not(done)
        at_step = tf.one_hot(step, max_len)
        # Sequences that have ended write zeros, so the buffers stay 0-padded.
        tokens += tf.cast(at_step, tf.int32)[None, :] * token[:, None]
        attention += (at_step[None, :, None]
                      * tf.where(live[:, None], weights, 0.0)[:, None, :])
        log_prob += tf.where(live, token_log_prob, 0.0)
        length += tf.cast(live, tf.int32)
        done = tf.logical_or(done, tf.equal(token, END_ID))
        return step + 1, token, done, carry, tokens, attention, log_prob, length

    _, _, _, _, tokens, attention, log_prob, length = tf.while_loop(
        not_finished, body,
        (tf.constant(0), tf.fill([batch], START_ID), tf.zeros([batch], tf.bool), carry,
         tf.zeros([batch, max_len], tf.int32), tf.zeros([batch, max_len, attention_size]),
         tf.zeros([batch]), tf.zeros([batch], tf.int32)),
        maximum_iterations=max_len)
    return {"tokens": tokens, "length": length, "log_prob": log_prob, "attention": attention}


def _check_max_len(model: Captioner, max_len: int) -> None:
    if not 1 <= max_len <= model.config.max_len:
        raise ValueError(f"max_len must be between 1 and the model's max_len "
                         f"({model.config.max_len}), got {max_len}")


def greedy_decode(model: Captioner, features: tf.Tensor, max_len: int,
                  controls: dict | None = None) -> dict[str, tf.Tensor]:
    """Greedy captions for features [B, H, W, C] with the cached `decode_step`, under the
    per-image `controls` (see `constrain`) if given.

    >>> from dist_caption.model.captioner import ModelConfig, build_captioner
    >>> model = build_captioner(ModelConfig(decoder="gru_attention", vocab_size=20,
    ...                                     feature_shape=(2, 3, 4), max_len=6, units=8))
    >>> out = greedy_decode(model, tf.zeros([1, 2, 3, 4], tf.float16), max_len=5)
    >>> out["tokens"].shape, out["attention"].shape
    (TensorShape([1, 5]), TensorShape([1, 5, 6]))
    """
    _check_max_len(model, max_len)
    batch = tf.shape(features)[0]
    memory = model.encode(features)

    def step_fn(step, token, tokens, state):
        return model.decode_step(token, step, memory, state)

    return _decode_loop(step_fn, model.initial_state(memory, batch), batch, max_len,
                        model.grid_size, controls=_broadcast_controls(controls, batch))


def sample_decode(model: Captioner, features: tf.Tensor, max_len: int, temperature: tf.Tensor,
                  seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Captions drawn token by token from softmax(logits / temperature), KV-cached.

    `temperature` (float, > 0) and `seed` (int64) are scalars or one per image. Each image's
    draws depend only on its own seed (Gumbel-max with noise from `stateless_uniform` seeded by
    (seed, step)), so a caption does not change with the batch it is decoded in. Towards
    temperature 0 sampling approaches greedy decoding. `log_prob` is under the model itself
    (temperature 1), so it compares with greedy and beam search.
    """
    _check_max_len(model, max_len)
    batch = tf.shape(features)[0]
    memory = model.encode(features)
    temperature = tf.broadcast_to(tf.cast(temperature, tf.float32), [batch])
    seeds = tf.broadcast_to(tf.cast(seed, tf.int64), [batch])
    vocab = model.config.vocab_size

    def choose(logits, step):
        step = tf.cast(step, tf.int64)
        uniform = tf.map_fn(
            lambda s: tf.random.stateless_uniform([vocab], tf.stack([s, step]), minval=1e-20),
            seeds, fn_output_signature=tf.TensorSpec([vocab], tf.float32))
        gumbel = -tf.math.log(-tf.math.log(uniform))
        return tf.argmax(logits / temperature[:, None] + gumbel, axis=-1, output_type=tf.int32)

    def step_fn(step, token, tokens, state):
        return model.decode_step(token, step, memory, state)

    return _decode_loop(step_fn, model.initial_state(memory, batch), batch, max_len,
                        model.grid_size, choose)


def beam_search_decode(model: Captioner, features: tf.Tensor, max_len: int,
                       beam_width, length_penalty=0.0,
                       controls: dict | None = None) -> dict[str, tf.Tensor]:
    """The `beam_width` most probable captions per image (by summed log-probability), KV-cached.

    Every image's memory is repeated per beam; at each step the cache rows are gathered from
    the beams the survivors descend from. A finished beam keeps its score and only extends with
    padding. Width 1 is greedy decoding. `beam_width` may be a tensor (one export, any width);
    it must not exceed the number of tokens the model can emit. With `length_penalty` a > 0
    the final beams are ranked by log_prob / length**a (a = 1: the mean per token), which
    favours longer captions than the summed log-probability does; `log_prob` stays the sum.
    `length_penalty` may be a tensor, one per image. `controls` (see `constrain`) apply to
    every beam of their image.
    """
    _check_max_len(model, max_len)
    batch = tf.shape(features)[0]
    width = tf.convert_to_tensor(beam_width, tf.int32)
    vocab = model.config.vocab_size
    memory = tf.nest.map_structure(lambda t: tf.repeat(t, width, axis=0),
                                   model.encode(features))
    state = model.initial_state(memory, batch * width)
    controls = _broadcast_controls(controls, batch * width, repeat=width)
    # Only a finished beam's padding continuation is free; everything else is out of reach.
    pad_only = tf.where(tf.range(vocab) == PAD_ID, 0.0, NEG_INF)
    # All beams start identical: only the first may expand at step 0.
    scores = tf.tile(tf.concat([[0.0], tf.fill([width - 1], NEG_INF)], 0)[None], [batch, 1])

    def not_finished(step, token, done, *_):
        return tf.logical_and(step < max_len, tf.logical_not(tf.reduce_all(done)))

    def body(step, token, done, state, tokens, scores, length):
        logits, state, _ = model.decode_step(tf.reshape(token, [-1]), step, memory, state)
        if controls is not None:
            logits = constrain(logits, step, tf.reshape(tokens, [-1, max_len]), controls)
        log_probs = tf.reshape(tf.nn.log_softmax(logits), [batch, width, vocab])
        log_probs = tf.where(done[:, :, None], pad_only, log_probs)
        total = tf.reshape(scores[:, :, None] + log_probs, [batch, width * vocab])
        scores, index = tf.math.top_k(total, width)
        # The loop's initial values have a static batch when the caller's features do.
        scores, index = tf.ensure_shape(scores, done.shape), tf.ensure_shape(index, done.shape)
        parent, token = index // vocab, index % vocab
        rows = tf.reshape(tf.range(batch)[:, None] * width + parent, [-1])
        state = tf.nest.map_structure(lambda t: tf.gather(t, rows), state)
        was_done = tf.gather(done, parent, batch_dims=1)
        tokens = tf.gather(tokens, parent, batch_dims=1)
        tokens += tf.cast(tf.one_hot(step, max_len), tf.int32)[None, None, :] * token[..., None]
        length = tf.gather(length, parent, batch_dims=1) + tf.cast(~was_done, tf.int32)
        done = tf.logical_or(was_done, tf.equal(token, END_ID))
        return step + 1, token, done, state, tokens, scores, length

    _, _, _, _, tokens, scores, length = tf.while_loop(
        not_finished, body,
        (tf.constant(0), tf.fill([batch, width], START_ID), tf.zeros([batch, width], tf.bool),
         state, tf.zeros([batch, width, max_len], tf.int32), scores,
         tf.zeros([batch, width], tf.int32)),
        maximum_iterations=max_len)
    if not isinstance(length_penalty, (int, float)) or length_penalty:
        penalty = tf.cast(length_penalty, tf.float32)
        if penalty.shape.rank:  # one per image
            penalty = penalty[:, None]
        ranked = scores / tf.maximum(tf.cast(length, tf.float32), 1.0) ** penalty
        order = tf.argsort(ranked, axis=1, direction="DESCENDING", stable=True)
        tokens, length, scores = (tf.gather(t, order, batch_dims=1)
                                  for t in (tokens, length, scores))
    return {"tokens": tokens, "length": length, "log_prob": scores}


def recompute_greedy_decode(model: Captioner, features: tf.Tensor,
                            max_len: int) -> dict[str, tf.Tensor]:
    """Greedy captions by calling the full model on [START] + tokens so far at every step.

    Quadratic in the caption length and not XLA-compilable (the prefix grows); no attention.
    """
    _check_max_len(model, max_len)
    batch = tf.shape(features)[0]
    start = tf.fill([batch, 1], START_ID)

    def step_fn(step, token, tokens, carry):
        prefix = tf.concat([start, tokens[:, :step]], axis=1)
        logits = model({"features": features, "tokens": prefix})[:, -1]
        return logits, carry, tf.zeros([batch, 0])

    decoded = _decode_loop(step_fn, (), batch, max_len, 0)
    del decoded["attention"]
    return decoded
