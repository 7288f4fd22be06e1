"""`python -m serving.publish EXPORT/VERSION DEST [--kubectl]`: parses its flags and calls
`serving.publish.publish` (see serving/publish/__init__.py for how each destination is written)."""

from __future__ import annotations

import os

from absl import flags

from serving import cli, config, declaring
from serving.publish import PublishError, publish

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The flags `serving.config.PublishSettings` declares."""
    declaring.define_flags(config.PublishSettings)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise PublishError("usage: python -m serving.publish EXPORT/VERSION DEST [--kubectl] "
                           "(e.g. exports/caption/3 /models/caption)")
    source, dest = argv[1], argv[2]
    if not os.path.isdir(source):
        raise PublishError(f"{source} is not a folder: pass an export version folder such as "
                           "exports/caption/3")
    kubectl = (dict(pod=FLAGS.pod, namespace=FLAGS.namespace, kubectl=FLAGS.kubectl_binary)
               if FLAGS.kubectl else None)
    final = publish(source, dest, FLAGS.version or None, not FLAGS.skip_check, kubectl)
    print(f"published {source} as {final}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, takes_positional=True)
