"""In-graph greedy decoding: a `tf.while_loop` that stops once every caption has ended.

`greedy_decode` feeds one token at a time through `Captioner.decode_step` (image work once,
key/value cache, static shapes: it compiles with XLA). `recompute_greedy_decode` re-runs the
whole model on the growing prefix at every step, as the tutorials do: the benchmark baseline
and the reference the tests compare with.

Both return a dict:
    tokens    int32 [B, max_len]  the tokens after [START], [END] included, 0 after it
    length    int32 [B]           tokens up to and including [END] (max_len if none)
    log_prob  float32 [B]         sum of the log-probabilities of those tokens
and `greedy_decode` also `attention` float32 [B, max_len, H*W] (0 after [END]).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from dist_caption.data.text import END_ID, START_ID
from dist_caption.model.captioner import Captioner

# (step, last token [B], tokens so far [B, max_len], carry) -> (logits [B, V], carry, attention)
StepFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, object], tuple[tf.Tensor, object, tf.Tensor]]


def _greedy_loop(step_fn: StepFn, carry, batch: tf.Tensor, max_len: int,
                 attention_size: int) -> dict[str, tf.Tensor]:
    def not_finished(step, token, done, *_):
        return tf.logical_and(step < max_len, tf.logical_not(tf.reduce_all(done)))

    def body(step, token, done, carry, tokens, attention, log_prob, length):
        logits, carry, weights = step_fn(step, token, tokens, carry)
        token = tf.where(done, 0, tf.argmax(logits, axis=-1, output_type=tf.int32))
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


def greedy_decode(model: Captioner, features: tf.Tensor, max_len: int) -> dict[str, tf.Tensor]:
    """Greedy captions for features [B, H, W, C] with the cached `decode_step`.

    >>> from dist_caption.model.captioner import ModelConfig, build_captioner
    >>> model = build_captioner(ModelConfig("gru_attention", vocab_size=20,
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

    return _greedy_loop(step_fn, model.initial_state(memory, batch), batch, max_len,
                        model.grid_size)


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

    decoded = _greedy_loop(step_fn, (), batch, max_len, 0)
    del decoded["attention"]
    return decoded
