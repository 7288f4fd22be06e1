"""A filtering `tee` for the shell scripts' logs: every line of standard input to LOG_FILE, and
to standard output all but TensorFlow's known notices (`console.is_noise`).

    ... 2>&1 | python -m dist_caption.log_filter LOG_FILE [--gpus]

`--gpus`: the host is expected to have GPUs, so a CUDA start-up failure is shown.
"""

from __future__ import annotations

import sys

from dist_caption.console import is_noise

USAGE = "usage: ... | python -m dist_caption.log_filter LOG_FILE [--gpus]"


def main(argv: list[str]) -> int:
    """stdin to argv[1], and to stdout all but the noise; 2 on a wrong command line."""
    if len(argv) not in (2, 3) or argv[2:] not in ([], ["--gpus"]):
        print(USAGE, file=sys.stderr)
        return 2
    gpus = argv[2:] == ["--gpus"]
    with open(argv[1], "a", encoding="utf-8") as log:
        for line in sys.stdin:
            log.write(line)
            log.flush()
            if not is_noise(line, gpus):
                sys.stdout.write(line)
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
