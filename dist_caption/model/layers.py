"""Building blocks of the captioners: attention written out by hand, so the same weights serve
the full teacher-forced pass and the one-token-at-a-time decoding step.

Attention scores are computed in the layer's compute dtype (float16 / bfloat16 under mixed
precision) and cast to float32 before masking and softmax: the -1e9 of a masked position does
not fit in float16. Masks are passed as booleans, so Keras never autocasts them.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from einops import rearrange

NEG_INF = -1e9
_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: consecutive counters land far apart


def _mix(h: tf.Tensor) -> tf.Tensor:
    """murmur3's 32-bit finaliser on uint32: each input bit flips each output bit with
    probability ~1/2, in eight cheap elementwise ops (three shift-xors, two multiplies)."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, shift))
        if multiplier:
            h = h * tf.constant(multiplier, tf.uint32)
    return h


def dropout_seed(*parts) -> tf.Tensor:
    """One uint32 seed hashed from integers (e.g. the run's seed, the step, the replica).

    >>> int(dropout_seed(0, 1)) != int(dropout_seed(1, 0))
    True
    """
    seed = tf.constant(0, tf.uint32)
    for part in parts:
        seed = _mix(tf.bitwise.bitwise_xor(seed * tf.constant(_GOLDEN, tf.uint32),
                                           tf.cast(part, tf.uint32)))
    return seed


class DropoutSeeds:
    """A fresh seed for each dropout call site, drawn in call order from one seed: the same
    model code given the same seed draws the same masks.

    >>> seeds = DropoutSeeds(dropout_seed(7))
    >>> int(seeds()) != int(seeds())
    True
    """

    def __init__(self, seed: tf.Tensor):
        self.seed, self.drawn = tf.cast(seed, tf.uint32), 0

    def __call__(self) -> tf.Tensor:
        self.drawn += 1
        return dropout_seed(self.seed, self.drawn)


class HashDropout(keras.layers.Layer):
    """Dropout whose mask is a hash of (seed, element index), not a random-number generator.

    XLA lowers TensorFlow's random ops to slow code on CPU (a stateless dropout is many times
    slower compiled than uncompiled there); this mask is a few integer ops per element, and the
    compiled and uncompiled step draw the same masks. `seeds` (`DropoutSeeds`) is required when training with a rate > 0; the trainer
    seeds each step from (--seed, step, replica), so a resumed run draws the masks again
    without saved state.

    >>> drop = HashDropout(0.25)
    >>> kept = drop(tf.ones([40000]), seeds=DropoutSeeds(dropout_seed(1)), training=True)
    >>> round(float(tf.reduce_mean(tf.cast(kept > 0, tf.float32))), 2), float(tf.reduce_max(kept))
    (0.75, 1.3333333730697632)
    >>> float(tf.reduce_sum(drop(tf.ones([4000]))))  # not training: the identity
    4000.0
    """

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, x, seeds: DropoutSeeds | None = None, training=False):
        if not training or not self.rate:
            return x
        if seeds is None:
            raise ValueError("training with dropout needs seeds=DropoutSeeds(seed)")
        index = tf.bitcast(tf.reshape(tf.range(tf.size(x)), tf.shape(x)), tf.uint32)
        bits = _mix(tf.bitwise.bitwise_xor(index, seeds()))  # uniform over [0, 2^32)
        keep = bits >= tf.constant(int(self.rate * 2 ** 32), tf.uint32)
        return tf.where(keep, x * tf.cast(1.0 / (1.0 - self.rate), x.dtype), tf.zeros_like(x))


def _masked_scores(scores: tf.Tensor, allowed: tf.Tensor | None) -> tf.Tensor:
    """float32 scores; positions where `allowed` is False get -1e9."""
    scores = tf.cast(scores, tf.float32)
    return scores if allowed is None else tf.where(allowed, scores, NEG_INF)


def _masked_softmax(scores: tf.Tensor, allowed: tf.Tensor | None) -> tf.Tensor:
    """float32 softmax over the last axis; positions where `allowed` is False get 0."""
    return tf.nn.softmax(_masked_scores(scores, allowed), axis=-1)


def _eigen_matmul(x: tf.Tensor, y: tf.Tensor, adjoint_b: bool = False) -> tf.Tensor:
    """`tf.matmul` of [..., M, K] by [..., K, N] as BatchMatMulV3, which oneDNN does not take
    over; float16 (no CPU kernel for V3) as `tf.matmul`.

    >>> _eigen_matmul(tf.ones([2, 1, 3]), tf.ones([2, 4, 3]), adjoint_b=True).shape
    TensorShape([2, 1, 4])
    """
    if x.dtype == tf.float16:
        return tf.matmul(x, y, adjoint_b=adjoint_b)
    return tf.raw_ops.BatchMatMulV3(x=x, y=y, Tout=x.dtype, adj_y=adjoint_b)


class Attention(keras.layers.Layer):
    """Multi-head dot-product attention with explicit query/key/value/output projections.

    Keys and values are projected by `project_kv` apart from the query, so a caller can compute
    them once (cross-attention over the image) or keep them in a cache (self-attention).

    >>> attention = Attention(units=8, num_heads=2)
    >>> grid = tf.zeros([1, 6, 8])
    >>> keys, values = attention.project_kv(grid)
    >>> out, weights = attention(tf.zeros([1, 3, 8]), keys, values)
    >>> out.shape, weights.shape
    (TensorShape([1, 3, 8]), TensorShape([1, 2, 3, 6]))
    >>> out, weights = attention(tf.zeros([1, 8]), keys, values)  # one position: 2-D
    >>> out.shape, weights.shape
    (TensorShape([1, 8]), TensorShape([1, 2, 1, 6]))
    """

    def __init__(self, units: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(units // num_heads)
        self.query = keras.layers.Dense(units)
        # No key bias: it adds the same q.b to every score of a query, which the softmax
        # cancels; its gradient is zero, so it would only collect Adam-amplified float noise.
        self.key = keras.layers.Dense(units, use_bias=False)
        self.value = keras.layers.Dense(units)
        self.out = keras.layers.Dense(units)

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        """[B, S, units] -> [B, heads, S, head_dim]; one position [B, units] -> [B, heads, 1,
        head_dim] by a reshape alone (the decoding step runs on 2-D tensors: fewer ops)."""
        if x.shape.rank == 2:
            return tf.reshape(x, [-1, self.num_heads, 1, x.shape[-1] // self.num_heads])
        return rearrange(x, "b s (h d) -> b h s d", h=self.num_heads)

    def project_kv(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """[B, S, units] -> keys, values [B, heads, S, head_dim]."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x))

    def call(self, x, keys, values, allowed=None):
        """x [B, T, units] (or one position, [B, units]) attends to keys/values [B, heads, S,
        head_dim].

        `allowed`: bool, broadcastable to [B, heads, T, S]. Returns the output [B, T, units]
        ([B, units]) and the float32 attention weights [B, heads, T, S] ([B, heads, 1, S]).
        """
        q = self._split_heads(self.query(x)) * tf.cast(self.scale, x.dtype)
        if x.shape.rank == 2:
            return self._attend_one(q, keys, values, allowed)
        weights = _masked_softmax(tf.einsum("bhtd,bhsd->bhts", q, keys), allowed)
        context = tf.einsum("bhts,bhsd->bhtd", tf.cast(weights, values.dtype), values)
        return self.out(rearrange(context, "b h t d -> b t (h d)")), weights

    def _attend_one(self, q, keys, values, allowed):
        """`call` for one query position (q [B, heads, 1, head_dim]).

        LogSoftmax + Exp rather than Softmax, and BatchMatMulV3 rather than tf.matmul's
        BatchMatMulV2: oneDNN replaces Softmax and BatchMatMulV2 with kernels that cost ~30 and
        ~40-70 us a call on these small tensors, against ~1 and ~7 us (measured at batch 1).
        """
        scores = _eigen_matmul(q, keys, adjoint_b=True)
        weights = tf.exp(tf.nn.log_softmax(_masked_scores(scores, allowed)))
        context = _eigen_matmul(tf.cast(weights, values.dtype), values)
        return self.out(tf.reshape(context, [-1, q.shape[1] * q.shape[3]])), weights


class FeedForward(keras.layers.Layer):
    """Position-wise two-layer MLP with ReLU.

    >>> FeedForward(units=8, hidden=32)(tf.zeros([1, 3, 8])).shape
    TensorShape([1, 3, 8])
    """

    def __init__(self, units: int, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden, activation="relu")
        self.out = keras.layers.Dense(units)

    def call(self, x):
        return self.out(self.hidden(x))


class GridPositionEmbedding(keras.layers.Layer):
    """Adds a learned row embedding plus a learned column embedding to a flattened H x W grid.

    Separate row and column tables let attention tell top from bottom and left from right.

    >>> GridPositionEmbedding(rows=2, cols=3)(tf.zeros([1, 6, 8])).shape
    TensorShape([1, 6, 8])
    """

    def __init__(self, rows: int, cols: int, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.cols = rows, cols

    def build(self, input_shape):
        units = input_shape[-1]
        self.row_embedding = self.add_weight(
            shape=(self.rows, units), initializer="random_normal", name="row_embedding")
        self.col_embedding = self.add_weight(
            shape=(self.cols, units), initializer="random_normal", name="col_embedding")

    def call(self, x):
        rows = tf.cast(self.row_embedding, x.dtype)
        cols = tf.cast(self.col_embedding, x.dtype)
        grid = rearrange(rows[:, None, :] + cols[None, :, :], "h w d -> (h w) d")
        return x + grid[None]


class PixelStem(keras.layers.Layer):
    """A small trainable CNN over raw pixel patches: [B, H, W, p*p*3] -> [B, H, W, channels].

    The patches are put back together into the [B, H*p, W*p, 3] image (`image`), each pixel's
    column and row are appended as two channels, then two 3x3 stride-2 convolutions, one
    p/4 x p/4 convolution of stride p/4 (back to the H x W grid) and a 3x3 convolution over the
    grid. Unlike a dense projection of each patch, the convolutions
    see an object's edges and corners wherever it falls on the patch grid, and a cell's vector
    describes the 3 x 3 cells around it (a receptive field of 3.25 patches), so shapes are
    learnt from few images.

    >>> PixelStem(patch=4, channels=8)(tf.zeros([1, 2, 3, 48])).shape
    TensorShape([1, 2, 3, 8])
    """

    def __init__(self, patch: int, channels: int, **kwargs):
        super().__init__(**kwargs)
        if patch % 4:
            raise ValueError(f"PixelStem needs a patch side divisible by 4, got {patch}")
        self.patch = patch
        self.convs = (
            keras.layers.Conv2D(channels // 4, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(channels // 2, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(channels, patch // 4, strides=patch // 4, activation="relu"),
            keras.layers.Conv2D(channels, 3, padding="same", activation="relu"))

    def image(self, patches):
        """[B, H, W, p*p*3] -> [B, H*p, W*p, 3]: the inverse of `backbones.Patches`."""
        return rearrange(patches, "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=self.patch,
                         p2=self.patch, c=3)

    def call(self, patches):
        x = self.image(patches) * 2 - 1  # [0, 1] pixels -> [-1, 1]
        # Two more channels, the pixel's column and row in [-1, 1] (CoordConv): every feature
        # can say where it is, in an order (top < bottom) the convolutions need not learn.
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        rows = tf.broadcast_to(tf.linspace(-1.0, 1.0, height)[:, None], [height, width])
        cols = tf.broadcast_to(tf.linspace(-1.0, 1.0, width)[None, :], [height, width])
        coords = tf.cast(tf.stack([cols, rows], -1), x.dtype)[None]
        x = tf.concat([x, tf.broadcast_to(coords, [tf.shape(x)[0], height, width, 2])], -1)
        for conv in self.convs:
            x = conv(x)
        return x


class TransformerEncoderBlock(keras.layers.Layer):
    """Self-attention over the image grid and a feed-forward, each with residual + LayerNorm.

    >>> TransformerEncoderBlock(units=8, num_heads=2, ff_units=32)(tf.zeros([1, 6, 8])).shape
    TensorShape([1, 6, 8])
    """

    def __init__(self, units: int, num_heads: int, ff_units: int, dropout: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.attention = Attention(units, num_heads)
        self.feed_forward = FeedForward(units, ff_units)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()
        self.dropout = HashDropout(dropout)

    def call(self, x, training=False, seeds=None):
        keys, values = self.attention.project_kv(x)
        attended, _ = self.attention(x, keys, values)
        x = self.norm1(x + self.dropout(attended, seeds=seeds, training=training))
        return self.norm2(x + self.dropout(self.feed_forward(x), seeds=seeds,
                                           training=training))


class TransformerDecoderBlock(keras.layers.Layer):
    """Causal self-attention, cross-attention over the image, feed-forward (post-LayerNorm).

    `call` runs a whole teacher-forced sequence; `step` runs one new token against a fixed-size
    key/value cache and gives the same numbers.

    >>> block = TransformerDecoderBlock(units=8, num_heads=2, ff_units=32)
    >>> image_kv = block.cross_attention.project_kv(tf.zeros([1, 6, 8]))
    >>> causal = tf.linalg.band_part(tf.ones([3, 3], tf.bool), -1, 0)
    >>> out, weights = block(tf.zeros([1, 3, 8]), image_kv, causal)
    >>> out.shape, weights.shape
    (TensorShape([1, 3, 8]), TensorShape([1, 2, 3, 6]))
    """

    def __init__(self, units: int, num_heads: int, ff_units: int, dropout: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.self_attention = Attention(units, num_heads)
        self.cross_attention = Attention(units, num_heads)
        self.feed_forward = FeedForward(units, ff_units)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()
        self.norm3 = keras.layers.LayerNormalization()
        self.dropout = HashDropout(dropout)

    def _finish(self, x, self_attended, image_kv, training, seeds=None):
        """Everything after self-attention: the part shared by `call` and `step`."""
        x = self.norm1(x + self.dropout(self_attended, seeds=seeds, training=training))
        attended, weights = self.cross_attention(x, *image_kv)
        x = self.norm2(x + self.dropout(attended, seeds=seeds, training=training))
        x = self.norm3(x + self.dropout(self.feed_forward(x), seeds=seeds, training=training))
        return x, weights

    def call(self, x, image_kv, causal, training=False, seeds=None):
        """x [B, T, units], image_kv from `cross_attention.project_kv`, causal bool [T, T];
        `seeds` (`DropoutSeeds`) for dropout when training."""
        keys, values = self.self_attention.project_kv(x)
        self_attended, _ = self.self_attention(x, keys, values, causal)
        return self._finish(x, self_attended, image_kv, training, seeds)

    def step(self, x, at_step, seen, image_kv, cache):
        """x [B, units]: one new token; cache = (keys, values) [B, heads, max_len, head_dim].

        `at_step` (bool [max_len, 1], True at the token's position) selects where the new
        key/value is written, so every shape is static; `seen` (bool [max_len]) the positions up
        to it. Returns (x, cross-attention weights [B, heads, 1, S], new cache).
        """
        new_keys, new_values = self.self_attention.project_kv(x)
        keys, values = (tf.where(at_step, new, old)
                        for new, old in zip((new_keys, new_values), cache))
        self_attended, _ = self.self_attention(x, keys, values, seen)
        x, weights = self._finish(x, self_attended, image_kv, training=False)
        return x, weights, (keys, values)


class BahdanauAttention(keras.layers.Layer):
    """Additive attention of Show, Attend and Tell: score = v . tanh(W1 grid + W2 hidden).

    `project_keys` (W1 grid) depends only on the image, so decoding computes it once.

    >>> attention = BahdanauAttention(units=8)
    >>> grid = tf.zeros([1, 6, 8])
    >>> context, weights = attention(tf.zeros([1, 8]), grid, attention.project_keys(grid))
    >>> context.shape, weights.shape
    (TensorShape([1, 8]), TensorShape([1, 6]))
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.keys = keras.layers.Dense(units)
        self.query = keras.layers.Dense(units)
        self.score = keras.layers.Dense(1)

    def project_keys(self, grid: tf.Tensor) -> tf.Tensor:
        return self.keys(grid)

    def call(self, hidden, grid, grid_keys):
        """hidden [B, units], grid and grid_keys [B, S, units] -> context [B, units], weights."""
        scores = self.score(tf.tanh(grid_keys + self.query(hidden)[:, None, :]))[..., 0]
        weights = _masked_softmax(scores, None)
        context = tf.einsum("bs,bsd->bd", tf.cast(weights, grid.dtype), grid)
        return context, weights


class VocabularyLogits(keras.layers.Layer):
    """float32 projection to the vocabulary; banned token ids always get a logit of -1e9.

    The ban is a constant added to the logits (not a variable), so training cannot undo it.
    `bias` initialises the output bias (e.g. log unigram frequencies).

    >>> layer = VocabularyLogits(vocab_size=5, banned_ids=(0, 2), bias=np.zeros(5, np.float32))
    >>> layer(tf.zeros([1, 8])).numpy().tolist()
    [[-1000000000.0, 0.0, -1000000000.0, 0.0, 0.0]]
    """

    def __init__(self, vocab_size: int, banned_ids: tuple[int, ...], bias: np.ndarray,
                 **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.dense = keras.layers.Dense(
            vocab_size, dtype="float32",
            bias_initializer=keras.initializers.Constant(bias))
        ban = np.zeros(vocab_size, np.float32)
        ban[list(banned_ids)] = NEG_INF
        self.ban = tf.constant(ban)

    def call(self, x):
        return self.dense(tf.cast(x, tf.float32)) + self.ban
