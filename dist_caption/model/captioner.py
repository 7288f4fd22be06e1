"""The captioning models and `build_captioner`, the one way to build them.

Both decoders share one contract, used by training (`call`), by in-graph decoding
(`encode` / `initial_state` / `decode_step`, see `decoding.py`) and by export:

    call({"features": [B, H, W, C], "tokens": int [B, T]}) -> float32 logits [B, T, V]
    call(..., training=True, seed=s)                -> the same with dropout masks hashed
                                                       from the uint32 seed s
    call({"features": [G, H, W, C], "tokens": int [B, T], "image_index": int [B]})
        -> the same, caption b read against image image_index[b] (each image encoded once)
    call({"grid": flat_grid(features), ...})        -> the same (the stem run apart)
    encode(features) -> memory                       # image work, once per image
    initial_state(memory, batch) -> state
    decode_step(token [B], step, memory, state) -> (logits [B, V], state, attention [B, H*W])

The models know nothing about tf.distribute.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from einops import rearrange

from dist_caption.config import ModelConfig
from dist_caption.data.text import BANNED_IDS
from dist_caption.model.layers import (
    BahdanauAttention, DropoutSeeds, GridPositionEmbedding, HashDropout, PixelStem,
    TransformerDecoderBlock, TransformerEncoderBlock, VocabularyLogits)

class Captioner(keras.Model):
    """Image grid features + caption prefix -> next-token logits (the shared contract).

    Build one with `build_captioner`. `call` takes the feature cache's float16 features (any
    float dtype; cast to the compute dtype) and int tokens, and returns float32 logits whatever
    the mixed-precision policy; logits of `BANNED_IDS` are always -1e9, so the training loss
    must mask padded targets (id 0).

    >>> config = ModelConfig(decoder="transformer", vocab_size=20, feature_shape=(2, 3, 4),
    ...                      max_len=6, units=8)
    >>> model = build_captioner(config)
    >>> logits = model({"features": np.zeros([1, 2, 3, 4], np.float16),
    ...                 "tokens": np.array([[2, 5, 6, 3, 0]])})
    >>> logits.shape, logits.dtype.name
    (TensorShape([1, 5, 20]), 'float32')
    """

    def __init__(self, config: ModelConfig, logit_bias: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        rows, cols, _ = config.feature_shape
        self.grid_size = rows * cols
        self.embedding = keras.layers.Embedding(config.vocab_size, config.units)
        self.dropout = HashDropout(config.dropout)
        self.logits_layer = VocabularyLogits(config.vocab_size, BANNED_IDS, logit_bias)
        self.stem = (PixelStem(config.pixel_patch, config.stem_channels)
                     if config.stem == "conv" else None)

    def flat_grid(self, features: tf.Tensor) -> tf.Tensor:
        """[B, H, W, C] -> [B, H*W, C'], through the convolutional stem if there is one."""
        features = tf.cast(features, self.compute_dtype)
        if self.stem is not None:
            features = self.stem(features)
        return rearrange(features, "b h w c -> b (h w) c")

    def call(self, inputs, training=False, seed=None):
        """`seed` (uint32 scalar, see `layers.dropout_seed`): dropout's masks when training."""
        seeds = None if seed is None else DropoutSeeds(seed)
        grid = inputs["grid"] if "grid" in inputs else self.flat_grid(inputs["features"])
        memory = self.encode_grid(grid, training=training, seeds=seeds)
        if "image_index" in inputs:  # several captions per image: encode each image once
            memory = tf.nest.map_structure(lambda m: tf.gather(m, inputs["image_index"]),
                                           memory)
        return self.decode_sequence(inputs["tokens"], memory, training=training, seeds=seeds)

    def encode(self, features: tf.Tensor, training: bool = False, seeds=None):
        """features [B, H, W, C] -> memory: everything decoding needs from the image."""
        return self.encode_grid(self.flat_grid(features), training=training, seeds=seeds)

    def encode_grid(self, grid: tf.Tensor, training: bool = False, seeds=None):
        """`encode` after the stem: grid [B, H*W, C'] from `flat_grid` -> memory."""
        raise NotImplementedError

    def decode_sequence(self, tokens: tf.Tensor, memory, training: bool = False,
                        seeds=None) -> tf.Tensor:
        """Teacher-forced pass: tokens [B, T] -> float32 logits [B, T, V]."""
        raise NotImplementedError

    def initial_state(self, memory, batch: tf.Tensor):
        """The decoder state before the first token ([START]) is fed."""
        raise NotImplementedError

    def decode_step(self, token: tf.Tensor, step: tf.Tensor, memory, state):
        """token [B] at position `step` -> (logits [B, V] float32, new state,
        attention over the grid [B, H*W] float32)."""
        raise NotImplementedError


class TransformerCaptioner(Captioner):
    """Transformer decoder over a projected image grid with learned 2-D position embeddings.

    memory = per-layer cross-attention (keys, values) [B, heads, H*W, head_dim];
    state = per-layer self-attention cache (keys, values) [B, heads, max_len, head_dim].

    >>> config = ModelConfig(decoder="transformer", vocab_size=20, feature_shape=(2, 3, 4),
    ...                      max_len=6, units=8)
    >>> model = build_captioner(config)
    >>> memory = model.encode(np.zeros([1, 2, 3, 4], np.float16))
    >>> state = model.initial_state(memory, 1)
    >>> logits, state, attention = model.decode_step(tf.constant([2]), 0, memory, state)
    >>> logits.shape, attention.shape
    (TensorShape([1, 20]), TensorShape([1, 6]))
    """

    def __init__(self, config: ModelConfig, logit_bias: np.ndarray, **kwargs):
        super().__init__(config, logit_bias, **kwargs)
        rows, cols, _ = config.feature_shape
        self.grid_projection = keras.layers.Dense(config.units)
        self.grid_positions = GridPositionEmbedding(rows, cols)
        # Tuples, not lists: Keras 3.15 leaves layers held in a list out of tf.train.Checkpoint.
        self.encoder_blocks = tuple(
            TransformerEncoderBlock(config.units, config.num_heads, config.feed_forward_units,
                                    config.dropout)
            for _ in range(config.encoder_layers))
        self.positions = keras.layers.Embedding(config.max_len, config.units)
        self.decoder_blocks = tuple(
            TransformerDecoderBlock(config.units, config.num_heads, config.feed_forward_units,
                                    config.dropout)
            for _ in range(config.num_layers))

    def encode_grid(self, grid, training=False, seeds=None):
        grid = self.grid_positions(self.grid_projection(grid))
        grid = self.dropout(grid, seeds=seeds, training=training)
        for block in self.encoder_blocks:
            grid = block(grid, training=training, seeds=seeds)
        return tuple(block.cross_attention.project_kv(grid) for block in self.decoder_blocks)

    def decode_sequence(self, tokens, memory, training=False, seeds=None):
        length = tf.shape(tokens)[1]
        x = self.embedding(tokens) + self.positions(tf.range(length))[None]
        x = self.dropout(x, seeds=seeds, training=training)
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
        for block, image_kv in zip(self.decoder_blocks, memory):
            x, _ = block(x, image_kv, causal, training=training, seeds=seeds)
        return self.logits_layer(x)

    def initial_state(self, memory, batch):
        keys, _ = memory[0]
        _, heads, _, head_dim = keys.shape
        empty = tf.zeros([batch, heads, self.config.max_len, head_dim], keys.dtype)
        return tuple((empty, empty) for _ in self.decoder_blocks)

    def decode_step(self, token, step, memory, state):
        # [B, units] tensors, not [B, 1, units]: a Dense on 2-D inputs is one MatMul.
        x = self.embedding(token) + self.positions(tf.reshape(step, [1]))
        positions = np.arange(self.config.max_len, dtype=np.int32)
        at_step, seen = tf.equal(positions[:, None], step), tf.less_equal(positions, step)
        new_state = []
        for block, image_kv, cache in zip(self.decoder_blocks, memory, state):
            x, weights, cache = block.step(x, at_step, seen, image_kv, cache)
            new_state.append(cache)
        attention = tf.reduce_mean(weights, axis=[1, 2])
        return self.logits_layer(x), tuple(new_state), attention


class ShowAttendTellCaptioner(Captioner):
    """GRU decoder with additive attention over the grid at every step (Xu et al., 2015).

    memory = (grid [B, H*W, units], attention keys of the grid); state = GRU hidden [B, units],
    initialised from the mean grid feature.

    >>> config = ModelConfig(decoder="gru_attention", vocab_size=20, feature_shape=(2, 3, 4),
    ...                      max_len=6, units=8)
    >>> model = build_captioner(config)
    >>> memory = model.encode(np.zeros([1, 2, 3, 4], np.float16))
    >>> state = model.initial_state(memory, 1)
    >>> logits, state, attention = model.decode_step(tf.constant([2]), 0, memory, state)
    >>> logits.shape, state.shape, attention.shape
    (TensorShape([1, 20]), TensorShape([1, 8]), TensorShape([1, 6]))
    """

    def __init__(self, config: ModelConfig, logit_bias: np.ndarray, **kwargs):
        super().__init__(config, logit_bias, **kwargs)
        self.grid_encoder = keras.layers.Dense(config.units, activation="relu")
        self.attention = BahdanauAttention(config.units)
        self.init_hidden = keras.layers.Dense(config.units, activation="tanh")
        self.cell = keras.layers.GRUCell(config.units)

    def encode_grid(self, grid, training=False, seeds=None):
        grid = self.dropout(self.grid_encoder(grid), seeds=seeds, training=training)
        return grid, self.attention.project_keys(grid)

    def _advance(self, embedded, memory, hidden):
        """One GRU step on an embedded token [B, units]: the new hidden state and attention."""
        context, weights = self.attention(hidden, *memory)
        hidden, _ = self.cell(tf.concat([embedded, context], axis=-1), hidden)
        return hidden, weights

    def decode_sequence(self, tokens, memory, training=False, seeds=None):
        embedded = self.dropout(self.embedding(tokens), seeds=seeds, training=training)
        hidden0 = self.initial_state(memory, tf.shape(tokens)[0])
        hidden, _ = tf.scan(
            lambda carry, x: self._advance(x, memory, carry[0]),
            rearrange(embedded, "b t d -> t b d"),
            initializer=(hidden0, tf.zeros(tf.shape(memory[0])[:2], tf.float32)))
        hidden = rearrange(hidden, "t b d -> b t d")
        return self.logits_layer(self.dropout(hidden, seeds=seeds, training=training))

    def initial_state(self, memory, batch):
        grid, _ = memory
        return self.init_hidden(tf.reduce_mean(grid, axis=1))

    def decode_step(self, token, step, memory, state):
        hidden, attention = self._advance(self.embedding(token), memory, state)
        return self.logits_layer(hidden), hidden, attention


def _log_frequency_bias(vocab_size: int, token_counts: np.ndarray | None) -> np.ndarray:
    """log of the add-one smoothed unigram distribution; zeros without counts."""
    if token_counts is None:
        return np.zeros(vocab_size, np.float32)
    counts = np.asarray(token_counts, np.float64)
    if counts.shape != (vocab_size,) or (counts < 0).any():
        raise ValueError(f"token_counts must be {vocab_size} non-negative counts (one per "
                         f"vocabulary id), got shape {counts.shape}")
    smoothed = counts + 1
    return np.log(smoothed / smoothed.sum()).astype(np.float32)


def build_captioner(config: ModelConfig, token_counts: np.ndarray | None = None) -> Captioner:
    """Validates `config`, creates the model and all its weights (one forward pass on zeros).

    `token_counts[i]` = how often token id i occurs in the training captions; it initialises the
    output bias to log unigram frequencies so training starts from the right marginals.
    """
    config.validate()
    bias = _log_frequency_bias(config.vocab_size, token_counts)
    if config.decoder == "transformer":
        model = TransformerCaptioner(config, bias)
    else:
        model = ShowAttendTellCaptioner(config, bias)
    model({"features": tf.zeros([1, *config.feature_shape], tf.float16),
           "tokens": tf.zeros([1, config.max_len - 1], tf.int32)})
    return model
