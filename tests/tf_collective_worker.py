"""A real TensorFlow worker for the launcher test: one MultiWorkerMirroredStrategy all-reduce
over the cluster in TF_CONFIG, then it joins (touches the ready file) and exits 0."""

from __future__ import annotations

import os

import tensorflow as tf


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(float(ctx.replica_id_in_sync_group + 1)))
    total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
    n = strategy.num_replicas_in_sync
    assert total == n * (n + 1) / 2, (total, n)
    open(os.environ["DIST_CAPTION_READY_FILE"], "w").close()
    print(f"{n} replicas, all-reduced sum {total:g}")


if __name__ == "__main__":
    main()
