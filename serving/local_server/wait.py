"""`python -m serving.local_server.wait READY_FILE PID [TIMEOUT_SECONDS]`: waits for a local
server started in the background (the quickstart's) and prints its gRPC port, or one `error:`
line and status 1 if it exits first or is not ready in time (then it is killed). See
`serving.local_server.process.wait`."""

from __future__ import annotations

import sys

from serving.local_server.process import DidNotStart, wait

USAGE = "usage: python -m serving.local_server.wait READY_FILE PID [TIMEOUT_SECONDS]"


def main(argv: list[str]) -> int:
    """The gRPC port on stdout (0), one `error:` line (1), or the usage (2)."""
    if len(argv) not in (2, 3) or not argv[1].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    try:
        ports = wait(argv[0], int(argv[1]), float(argv[2]) if len(argv) == 3 else 120)
    except DidNotStart as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(ports["port"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
