"""The serving contract: the signatures an export has, their inputs and their outputs.

The export (`dist_caption.exporting`) builds its signatures from these names, checks the
SavedModel it wrote against them, and records the contract in the export's metadata; the client,
`dist_caption.predict` and the tests read the names from here. Pure Python, so that `serving/`
and `dist_caption/` may both import it (serving imports nothing from dist_caption).

B images, K beams, L = the model's max_len, H x W the feature grid, C its channels:

| signature          | inputs                                               | outputs |
|--------------------|------------------------------------------------------|---------|
| `serving_default`  | `image_bytes` string [B]; optional decoding controls | `caption` string [B], `tokens` int32 [B, L], `length` int32 [B], `log_prob` float32 [B], `attention` float32 [B, L, H*W] |
| `caption_features` | `features` float32 [B, H, W, C]                      | as `serving_default` |
| `beam_search`      | `image_bytes` string [B], `beam_width` int32 [B]; optional decoding controls and `length_penalty` | `caption` [B, K], `tokens` [B, K, L], `length` [B, K], `log_prob` [B, K], best first |
| `sample`           | `image_bytes` string [B], `temperature` float32 [B], `seed` int64 [B] | as `serving_default` without `attention` |
| `model_card`       | `request` int32 [B] (any values: one card per row)  | `model_card` string [B], the JSON of `assets.extra/model_card.json` |

The decoding controls (`CONTROLS`, their defaults in `DEFAULTS`, each one value or one per
image; a default leaves the captions exactly as without it):

| input                | dtype   | default | meaning                                                  |
|----------------------|---------|---------|----------------------------------------------------------|
| `max_length`         | int32   | 0       | at most this many words (0: the model's own limit, L)    |
| `min_length`         | int32   | 0       | at least this many words before [END]                    |
| `no_repeat_ngram`    | int32   | 0       | never repeat an n-gram of this size (3: trigram blocking)|
| `repetition_penalty` | float32 | 1.0     | >= 1: a word already used scores lower (CTRL's penalty)  |
| `length_penalty`     | float32 | 0.0     | `beam_search` only: rank beams by log_prob / length**a   |

The SavedModel records the defaults (SignatureDef `defaults`), which TensorFlow Serving fills in
for a gRPC request that leaves a control out. Two cases still need every input sent: REST (an
instance's keys must be all the signature's inputs) and a server with `--enable_batching` and a
request of more than one image (a default holds one value, and batching needs every input to
have the request's batch size). The client always sends them all.

`model_card` lets a client ask the served version what it is (TensorFlow Serving's
GetModelMetadata returns only the SignatureDefs); its input exists because TensorFlow Serving's
batching refuses a request without a batched input.
"""

from __future__ import annotations

import dataclasses

# Inputs.
IMAGE_BYTES, FEATURES, BEAM_WIDTH, TEMPERATURE, SEED = (
    "image_bytes", "features", "beam_width", "temperature", "seed")
# The decoding controls (dist_caption.model.decoding.constrain) and their defaults.
MAX_LENGTH, MIN_LENGTH, NO_REPEAT_NGRAM, REPETITION_PENALTY, LENGTH_PENALTY = (
    "max_length", "min_length", "no_repeat_ngram", "repetition_penalty", "length_penalty")
CONTROLS = {MAX_LENGTH: "int32", MIN_LENGTH: "int32", NO_REPEAT_NGRAM: "int32",
            REPETITION_PENALTY: "float32"}
DEFAULTS = {MAX_LENGTH: 0, MIN_LENGTH: 0, NO_REPEAT_NGRAM: 0, REPETITION_PENALTY: 1.0,
            LENGTH_PENALTY: 0.0}
# Outputs.
CAPTION, TOKENS, LENGTH, LOG_PROB, ATTENTION = "caption", "tokens", "length", "log_prob", "attention"
CAPTION_OUTPUTS = (CAPTION, TOKENS, LENGTH, LOG_PROB)  # what every signature returns

DEFAULT, CAPTION_FEATURES, BEAM_SEARCH, SAMPLE, MODEL_CARD = (
    "serving_default", "caption_features", "beam_search", "sample", "model_card")
REQUEST = "request"  # model_card's input; its output is named MODEL_CARD too
# Every export carries its card here (written by the export, required by serving.publish).
MODEL_CARD_FILE = "assets.extra/model_card.json"


@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature: its input names (with their dtypes), its output names, and the inputs a
    request may leave out (their defaults are `DEFAULTS`)."""
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    optional: tuple[str, ...] = ()


SIGNATURES = {
    DEFAULT: Signature({IMAGE_BYTES: "string", **CONTROLS}, (*CAPTION_OUTPUTS, ATTENTION),
                       tuple(CONTROLS)),
    CAPTION_FEATURES: Signature({FEATURES: "float32"}, (*CAPTION_OUTPUTS, ATTENTION)),
    BEAM_SEARCH: Signature({IMAGE_BYTES: "string", BEAM_WIDTH: "int32", **CONTROLS,
                            LENGTH_PENALTY: "float32"}, CAPTION_OUTPUTS,
                           (*CONTROLS, LENGTH_PENALTY)),
    SAMPLE: Signature({IMAGE_BYTES: "string", TEMPERATURE: "float32", SEED: "int64"},
                      CAPTION_OUTPUTS),
    MODEL_CARD: Signature({REQUEST: "int32"}, (MODEL_CARD,)),
}


def optional_inputs(signature: str) -> dict[str, tuple[str, float | int]]:
    """{input: (dtype, default)} of the inputs `signature` lets a request leave out (none for
    a signature outside the contract)."""
    found = SIGNATURES.get(signature)
    return {name: (found.inputs[name], DEFAULTS[name]) for name in found.optional} \
        if found else {}


def as_json() -> dict:
    """The contract as the export's metadata records it."""
    return {name: {"inputs": s.inputs, "outputs": list(s.outputs),
                   "defaults": {k: DEFAULTS[k] for k in s.optional}}
            for name, s in SIGNATURES.items()}


def mismatches(found: dict[str, tuple[dict[str, str], tuple[str, ...], dict]]) -> list[str]:
    """What differs between `found` ({signature: ({input: dtype}, outputs, {input: default}),
    read from a SavedModel) and the contract, one line each; empty if they agree."""
    problems = [f"signature {name} is missing" for name in SIGNATURES if name not in found]
    problems += [f"signature {name} is not in the contract" for name in found
                 if name not in SIGNATURES]
    for name, (inputs, outputs, defaults) in found.items():
        want = SIGNATURES.get(name)
        if want is None:
            continue
        if inputs != want.inputs:
            problems.append(f"{name} takes {dict(sorted(inputs.items()))}, the contract says "
                            f"{dict(sorted(want.inputs.items()))}")
        if sorted(outputs) != sorted(want.outputs):
            problems.append(f"{name} returns {sorted(outputs)}, the contract says "
                            f"{sorted(want.outputs)}")
        if defaults != {k: DEFAULTS[k] for k in want.optional}:
            problems.append(f"{name} has defaults {dict(sorted(defaults.items()))}, the "
                            f"contract says "
                            f"{ {k: DEFAULTS[k] for k in want.optional} }")
    return problems
