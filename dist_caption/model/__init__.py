"""The captioning model (`build_captioner`, the one way to build it) and in-graph decoding."""

from dist_caption.model.captioner import (
    Captioner, ModelConfig, ShowAttendTellCaptioner, TransformerCaptioner, build_captioner)
from dist_caption.model.decoding import (
    beam_search_decode, greedy_decode, recompute_greedy_decode, sample_decode)
from dist_caption.model.layers import dropout_seed

__all__ = ["Captioner", "ModelConfig", "ShowAttendTellCaptioner", "TransformerCaptioner",
           "beam_search_decode", "build_captioner", "dropout_seed", "greedy_decode", "recompute_greedy_decode",
           "sample_decode"]
