"""The model every serving-side benchmark measures: the quickstart's decoder size with random
weights and [END] made unreachable, so every caption is exactly `CAPTION_TOKENS` long.

Transformer decoder, 2 layers, width 256, 2 heads, feed-forward 1024, vocabulary 1000, on the
8x8x432 `patches` grid (96x96 images), with the linear stem (the conv stem the quickstart now
trains adds ~16 MFLOP per image, about 12% of a 20-token caption's work).
"""

from __future__ import annotations

import tensorflow as tf

from dist_caption import exporting
from dist_caption.data import backbones, text
from dist_caption.data.text import END_ID
from dist_caption.model import ModelConfig, build_captioner

CAPTION_TOKENS = 20
IMAGE_SIZE = 96
CONFIG = ModelConfig(decoder="transformer", vocab_size=1000, feature_shape=(8, 8, 432),
                     max_len=CAPTION_TOKENS, num_layers=2, units=256, num_heads=2, dropout=0.0)
DESCRIPTION = {"decoder": "transformer", "layers": 2, "units": 256, "heads": 2, "ff": 1024,
               "vocab": 1000, "grid": "8x8x432", "caption_tokens": CAPTION_TOKENS}


def endless_model():
    """Random weights (seed 0); [END] never chosen, so captions have a fixed length."""
    tf.random.set_seed(0)
    model = build_captioner(CONFIG)
    bias = model.logits_layer.dense.bias
    bias.assign(tf.tensor_scatter_nd_update(bias, [[END_ID]], [-1e4]))
    return model


def module(model, xla: bool, max_batch: int = 64):
    """The export's `tf.Module` around `model` (the patches backbone, a dummy vocabulary)."""
    vocab = text.Vocabulary(list(text.SPECIALS)
                            + [f"w{i}" for i in range(CONFIG.vocab_size - len(text.SPECIALS))])
    return exporting.build_module(model, backbones.build_backbone("patches", "none"), vocab,
                               image_size=IMAGE_SIZE, max_pixels=10_000_000,
                               max_batch=max_batch, max_beam=4, xla=xla,
                               model_card={"benchmark": "bench_model"})


def flops_per_caption(config: ModelConfig = CONFIG, tokens: int = CAPTION_TOKENS) -> dict:
    """Multiply-adds x 2 of KV-cached greedy decoding, from the layer shapes (embedding
    lookups, softmax and normalisation left out): image work once, then `tokens` steps."""
    rows, cols, channels = config.feature_shape
    grid, units, ff = rows * cols, config.units, config.feed_forward_units
    encode = 2 * grid * channels * units + config.num_layers * 2 * (2 * grid * units * units)
    per_token = config.num_layers * (
        4 * 2 * units * units          # self-attention q, k, v, out
        + 2 * 2 * config.max_len * units  # scores and context over the key/value cache
        + 2 * 2 * units * units          # cross-attention q, out
        + 2 * 2 * grid * units           # cross-attention scores and context
        + 2 * 2 * units * ff)            # feed-forward
    per_token += 2 * units * config.vocab_size  # output logits
    return {"encode": encode, "per_token": per_token, "caption": encode + tokens * per_token}
