"""`python -m serving.client`: parses its flags and calls `serving.client.CaptionClient` (see
serving/client/__init__.py for the command line, the exit statuses and the library)."""

from __future__ import annotations

import json

from absl import flags

from serving import cli, config, contract, declaring
from serving.client import EXIT_USAGE, TLS, CaptionClient, ClientError, format_beams

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The flags `serving.config.ClientSettings` declares."""
    declaring.define_flags(config.ClientSettings)


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
