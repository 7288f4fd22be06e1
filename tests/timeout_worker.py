"""A real TensorFlow worker for the timeout tests: the trainer's strategy with the given
timeouts, then one all-reduce, which worker 1 enters `--late` seconds after the others.

    python tests/timeout_worker.py --collective 2 --late 10   # TF_CONFIG from env
Prints `sum <total>` on success; a TensorFlow error ends it with its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import tensorflow as tf

from dist_caption import training


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--collective", type=float, default=0.0)
    p.add_argument("--late", type=float, default=0.0)
    args = p.parse_args()
    strategy = training.make_strategy("auto", 0, training.ClusterTimeouts(
        args.heartbeat, args.collective))
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
        time.sleep(args.late)
    print(f"sum {float(training._all_sum(strategy, tf.constant(1.0))):g}", flush=True)


if __name__ == "__main__":
    main()
