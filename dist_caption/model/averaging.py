"""An exponential moving average of a model's trainable weights (`--ema_decay`).

After every applied step, average = decay * average + (1 - decay) * weights; the averages
start as the weights they follow. Each is a SyncOnRead variable: every replica updates its own
copy from its own (identical) weights, so keeping the average costs no communication, and a
checkpoint saves and restores it like any other variable (as `ema/averages/<i>`).

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
        self.averages = [
            tf.Variable(tf.identity(w.value), trainable=False, name=f"ema_{i}",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for i, w in enumerate(model.trainable_variables)]

    def update(self, model) -> None:
        """One step of the average, in replica context (after the weights were updated)."""
        for average, weight in zip(self.averages, model.trainable_variables):
            average.assign(self.decay * average + (1.0 - self.decay) * weight.value)

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
