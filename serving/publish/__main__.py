"""`python -m serving.publish EXPORT/VERSION DEST [--kubectl]`: parses its flags and calls
`serving.publish.publish` (see serving/publish/__init__.py for how each destination is written)."""

from __future__ import annotations

import os

from absl import flags

from serving import cli
from serving.publish import DEFAULT_NAMESPACE, DEFAULT_POD, PublishError, publish

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer("version", 0, "Version number to publish as (0: the source folder's "
                         "name).")
    flags.DEFINE_bool("skip_check", False, "Do not load the export and replay its warm-up "
                      "before publishing (the folder layout is still checked).")
    flags.DEFINE_bool("kubectl", False, "DEST is a folder inside the k8s/serving/tools pod (e.g. "
                      "/models/caption): kubectl cp, then mv inside the pod.")
    flags.DEFINE_string("pod", DEFAULT_POD, "With --kubectl: the pod.")
    flags.DEFINE_string("namespace", DEFAULT_NAMESPACE, "With --kubectl: its namespace.")
    flags.DEFINE_string("kubectl_binary", "kubectl", "With --kubectl: the kubectl to run.")


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
