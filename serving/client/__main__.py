"""`python -m serving.client`: parses its flags and calls `serving.client.CaptionClient` (see
serving/client/__init__.py for the command line, the exit statuses and the library)."""

from __future__ import annotations

import json

from absl import flags

from serving import cli, contract
from serving.client import (DEFAULT_MODEL_NAME, DEFAULT_SERVER, DEFAULT_SIGNATURE, EXIT_USAGE,
                            TLS, CaptionClient, ClientError, format_beams)

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("server", DEFAULT_SERVER, "gRPC address host:port of the model server.")
    flags.DEFINE_string("rest", None, "Use the REST API at this URL (http://host:8501) instead "
                        "of gRPC.")
    flags.DEFINE_string("model_name", DEFAULT_MODEL_NAME, "Served model name.")
    flags.DEFINE_string("signature", DEFAULT_SIGNATURE, "Signature (greedy captions).")
    flags.DEFINE_integer("version", None, "Ask for this model version.")
    flags.DEFINE_string("version_label", None, "Ask for the version with this label.")
    flags.DEFINE_float("timeout", 30.0, "Deadline in seconds for the whole call, retries "
                       "included.")
    flags.DEFINE_integer("beam", 0, "Beam width: use the beam_search signature.")
    flags.DEFINE_integer("max_length", contract.DEFAULTS[contract.MAX_LENGTH],
                         "At most this many words per caption (0: the model's own limit).")
    flags.DEFINE_integer("min_length", contract.DEFAULTS[contract.MIN_LENGTH],
                         "At least this many words per caption.")
    flags.DEFINE_integer("no_repeat_ngram", contract.DEFAULTS[contract.NO_REPEAT_NGRAM],
                         "Never repeat an n-gram of this size in a caption (3: trigram "
                         "blocking; 0: off).")
    flags.DEFINE_float("repetition_penalty", contract.DEFAULTS[contract.REPETITION_PENALTY],
                       "At least 1: a word already in the caption scores lower (1: off).")
    flags.DEFINE_float("length_penalty", contract.DEFAULTS[contract.LENGTH_PENALTY],
                       "With --beam: rank beams by log-probability / length**a (0: off).")
    flags.DEFINE_bool("tls", False, "Connect with TLS.")
    flags.DEFINE_string("ca_cert", None, "PEM CA certificate that signed the server's.")
    flags.DEFINE_string("client_cert", None, "PEM client certificate (mutual TLS).")
    flags.DEFINE_string("client_key", None, "PEM private key of --client_cert.")
    flags.DEFINE_bool("json", False, "Print one JSON object per image.")
    flags.DEFINE_bool("model_card", False, "Print the served version's model card (commit, "
                      "data, backbone, settings, checkpoint, metrics) instead of captioning.")
    flags.register_validator("timeout", lambda v: v > 0, message="--timeout must be positive")
    flags.register_validator("beam", lambda v: v >= 0, message="--beam must not be negative")
    flags.register_validator("version", lambda v: v is None or v > 0,
                             message="--version must be a positive integer")


def main(argv: list[str]) -> None:
    images = argv[1:]
    if FLAGS.model_card and images:
        raise ClientError("--model_card takes no image files: python -m serving.client "
                          "--model_card", EXIT_USAGE)
    if not images and not FLAGS.model_card:
        raise ClientError("name at least one image file: python -m serving.client img.jpg",
                          EXIT_USAGE)
    tls = None
    if FLAGS.tls or FLAGS.ca_cert or FLAGS.client_cert:
        if bool(FLAGS.client_cert) != bool(FLAGS.client_key):
            raise ClientError("--client_cert and --client_key go together", EXIT_USAGE)
        tls = TLS(FLAGS.ca_cert, FLAGS.client_cert, FLAGS.client_key)
    with CaptionClient(FLAGS.server, FLAGS.model_name, FLAGS.signature, FLAGS.version,
                       FLAGS.version_label, FLAGS.timeout, tls, FLAGS.rest) as client:
        if FLAGS.model_card:
            print(json.dumps(client.model_card(), indent=2, sort_keys=True))
            return
        controls = {name: getattr(FLAGS, name) for name in contract.DEFAULTS
                    if getattr(FLAGS, name) != contract.DEFAULTS[name]}
        results = client.caption(images, beam=FLAGS.beam, controls=controls)
    for path, result in zip(images, results):
        if FLAGS.json:
            print(json.dumps({"image": path, **result}))
        elif FLAGS.beam:
            print(format_beams(path, result["beams"]))
        else:
            print(f"{path}: {result['caption']}")


def run() -> None:
    """The command line: one `error:` line and the documented exit status on failure."""
    define_flags()
    cli.run(main, takes_positional=True)


if __name__ == "__main__":
    run()
