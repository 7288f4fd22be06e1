"""The captioning model (`build_captioner`, the one way to build it) and in-graph decoding."""

from dist_caption.model.captioner import (
    Captioner, ModelConfig, ShowAttendTellCaptioner, TransformerCaptioner, build_captioner)
from dist_caption.model.decoding import (
    beam_search_decode, greedy_decode, recompute_greedy_decode, sample_decode)

__all__ = ["Captioner", "ModelConfig", "ShowAttendTellCaptioner", "TransformerCaptioner",
           "beam_search_decode", "build_captioner", "greedy_decode", "recompute_greedy_decode",
           "sample_decode"]
