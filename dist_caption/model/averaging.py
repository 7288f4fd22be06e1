"""An exponential moving average of a model's trainable weights (`--ema_decay`).

After the n-th applied step, average = d_n * average + (1 - d_n) * weights, with
d_n = min(decay, (1 + n) / (10 + n)): Model Garden's `ExponentialMovingAverage` with its
default `dynamic_decay`, so the first steps move the average quickly away from the initial
weights it starts as (with a fixed 0.999 the random initialisation still held half the
average after 700 steps, and the quickstart's first validations scored 0% scenes). Each
average, and the count n, is a SyncOnRead variable: every replica updates its own copy from
its own (identical) weights, so keeping the average costs no communication, and a checkpoint
saves and restores it like any other variable (as `ema/averages/<i>`, `ema/updates`).

Validation during training, the best checkpoint's choice, `evaluate`, `export` and
`--init_from` use the averaged weights of a run that kept them: `swapped_in` lends them to the
model for a while, `restore_into` loads them from a checkpoint in place of the weights.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

CHECKPOINT_KEY = "ema"  # tf.train.Checkpoint(..., ema=WeightAverages)


class WeightAverages(tf.Module):
    """The averages of `model.trainable_variables`; create it in the strategy's scope."""

    def __init__(self, model, decay: float):
        super().__init__(name="ema")
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        sync = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.updates = tf.Variable(0, dtype=tf.int64, name="ema_updates", **sync)
        self.averages = [
            tf.Variable(tf.identity(w.value), name=f"ema_{i}", **sync)
            for i, w in enumerate(model.trainable_variables)]

    def start_from(self, model) -> None:
        """The averages restart at the model's weights (a stage starting from --init_from's)."""
        for average, weight in zip(self.averages, model.trainable_variables):
            average.assign(weight.value.read_value())

    def update(self, model) -> None:
        """One step of the average, in replica context (after the weights were updated)."""
        n = tf.cast(self.updates.assign_add(1), tf.float32)
        decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
        for average, weight in zip(self.averages, model.trainable_variables):
            average.assign(decay * average + (1.0 - decay) * weight.value)

    @contextlib.contextmanager
    def swapped_in(self, model):
        """The model holds the averaged weights inside the block, its own weights after."""
        weights = [w.value.read_value() for w in model.trainable_variables]
        for weight, average in zip(model.trainable_variables, self.averages):
            weight.assign(average.read_value())
        try:
            yield
        finally:
            for weight, value in zip(model.trainable_variables, weights):
                weight.assign(value)


class _Into(tf.Module):
    """Has the checkpoint shape of `WeightAverages`, holding the model's own variables."""

    def __init__(self, model):
        super().__init__(name="ema")
        self.averages = [w.value for w in model.trainable_variables]


def restore_into(model, path: str) -> None:
    """Loads the averages saved in the checkpoint `path` as `model`'s trainable weights."""
    tf.train.Checkpoint(**{CHECKPOINT_KEY: _Into(model)}).restore(path).expect_partial() \
        .assert_existing_objects_matched()
