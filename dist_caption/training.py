"""The trainer: strategy, input, model, step, checkpoints, evaluation, loop; read top to bottom.
`run(TrainConfig)` trains; `python -m dist_caption.train` (train.py) is its command.

A custom loop over `strategy.run` (Keras `fit` fails under MultiWorkerMirroredStrategy). Each
step all-reduces, in one collective, the gradients of the *summed* token loss together with the
token count, so the loss is the mean over the global batch whatever the replica count; the
summed gradient is then clipped by its global norm and checked for overflow on every replica
alike (a float16 overflow on any replica skips the step everywhere and halves the loss scale).
Keras' optimizer is told not to sum the gradients a second time.

`--objective scst` (self-critical sequence training, from `--init_from`'s weights): a step takes
`--global_batch_size` images, and each replica samples `--scst_samples` captions per image of its
share in the graph, rewards each with its CIDEr-D against
the image's references (`model/cider.py`, document frequencies of the training references),
subtracts a baseline (the image's other samples' mean reward, or its greedy caption's), and
takes the gradient of the advantage-weighted log-probabilities of the sampled tokens; the same
single all-reduce sums those gradients with the token count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import keras
import tensorflow as tf
from absl import logging

from dist_caption import cluster, config, console, evaluation, run_dir
from dist_caption.config import TrainConfig, TrainSettings
from dist_caption.data import pipeline
from dist_caption.data.text import BANNED_IDS, END_ID, START_ID
from dist_caption.errors import UserError
from dist_caption import files
from dist_caption.files import atomic_path
from dist_caption.cluster import PEER_LOST, PEER_LOST_LINE, PREEMPTED, READY_FILE_ENV
from dist_caption.metrics import format_metrics
from dist_caption.model import averaging, cider
from dist_caption.model.captioner import build_captioner
from dist_caption.model.decoding import greedy_decode, sample_decode
from dist_caption.model.layers import dropout_seed
from dist_caption.progress import Progress
from dist_caption.tracing import traced
from serving import declaring



# --------------------------------------------------------------------------------- strategy

@dataclasses.dataclass(frozen=True)
class StrategyChoice:
    """Which tf.distribute strategy to build: `kind` default, mirrored (over `devices`) or
    multi_worker (all-reducing with `communication`, NCCL or RING)."""
    kind: str
    devices: tuple[str, ...] = ()
    communication: str | None = None


def choose_strategy(name: str, tasks: int, gpus, cpu_devices: int) -> StrategyChoice:
    """The strategy for `--strategy name` given TF_CONFIG's task count, this process's GPUs
    (their names) and `--cpu_devices`; decided from these alone, nothing is read from the
    machine.

    auto: multi_worker with more than one task (each worker's GPUs are its replicas), mirrored
    over the GPUs with more than one, or over the logical CPUs with `cpu_devices` > 1, else the
    default strategy. Workers on GPUs all-reduce with NCCL, on CPUs with TensorFlow's ring
    (NCCL only reduces GPU tensors).
    """
    if name == "auto":
        name = ("multi_worker" if tasks > 1 else
                "mirrored" if len(gpus) > 1 or cpu_devices > 1 else "default")
    if name == "multi_worker":
        return StrategyChoice("multi_worker", communication="NCCL" if gpus else "RING")
    if name == "mirrored":
        devices = [f"/gpu:{i}" for i in range(len(gpus))] or [
            f"/cpu:{i}" for i in range(max(1, cpu_devices))]
        return StrategyChoice("mirrored", tuple(devices))
    return StrategyChoice("default")


def choose_precision_and_xla(precision: str, xla: str, gpus,
                             cpu_devices: int = 0) -> tuple[str, bool]:
    """`--precision` and `--xla` with auto resolved for this process's GPUs and
    `--cpu_devices`: mixed_float16 (with the step's own dynamic loss scaling) and XLA on GPUs;
    float32 on CPUs, compiled where benchmarks/train_step.py measures XLA faster: float32 with
    the CPU whole (1.06x tf.function at the quickstart's configuration), not bfloat16 (0.83x:
    XLA's CPU bfloat16 matmuls run at half the rate of TensorFlow's own), nor split into
    logical devices (0.87x with two)."""
    if precision == "auto":
        precision = "mixed_float16" if gpus else "float32"
    if xla == "auto":
        return precision, bool(gpus) or (precision == "float32" and cpu_devices <= 1)
    return precision, xla == "true"


def local_gpus() -> list[str]:
    """This process's GPUs (the physical devices TensorFlow sees), by name."""
    return [d.name for d in tf.config.list_physical_devices("GPU")]


@dataclasses.dataclass(frozen=True)
class ClusterTimeouts:
    """How long a multi-worker run waits for its peers, in seconds: for a worker's heartbeat
    (the coordination service, hosted by the chief, then fails every worker's collectives)
    and for one collective (0: no limit). A worker that never joins is the launcher's to
    time out (--startup_timeout): the service's registration timeout did not end a lone
    worker's wait (tests/test_faults.py)."""
    heartbeat: float = TrainSettings.heartbeat_timeout
    collective: float = TrainSettings.collective_timeout


def configure_coordination(timeouts: ClusterTimeouts) -> None:
    """Sets the coordination service's heartbeat timeout for the TF_CONFIG cluster.

    MultiWorkerMirroredStrategy configures the service with TensorFlow's defaults (a 10 s
    heartbeat) unless it is configured already; this configures it as the
    strategy would (same leader, same jobs), with our timeouts. Through TensorFlow's internal
    eager context: no public API sets them.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=int(timeouts.heartbeat * 1000))


def make_strategy(name: str, cpu_devices: int = 0,
                  timeouts: ClusterTimeouts = ClusterTimeouts()):
    """The tf.distribute strategy `choose_strategy` picks for this process; must run before
    any other TensorFlow op (it turns on GPU memory growth and splits the CPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Processes sharing a host's GPUs each take memory as they need it, not all at start.
        tf.config.experimental.set_memory_growth(gpu, True)
    if cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    choice = choose_strategy(name, cluster.tf_config_tasks(os.environ), [g.name for g in gpus],
                             cpu_devices)
    if choice.kind == "multi_worker":
        implementation = getattr(tf.distribute.experimental.CommunicationImplementation,
                                 choice.communication)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, timeout_seconds=timeouts.collective or None)
        configure_coordination(timeouts)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if choice.kind == "mirrored":
        return tf.distribute.MirroredStrategy(list(choice.devices))
    return tf.distribute.get_strategy()


def worker_info(strategy) -> tuple[int, int]:
    """(this worker's index, number of workers); index 0 is the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    return resolver.task_id or 0, len(resolver.cluster_spec().as_dict().get("worker", [0]))


# --------------------------------------------------------------------------------- input

def train_dataset(strategy, cfg: TrainConfig, manifest: dict, skip: int):
    """The whole run's distributed batches, one endless, seeded stream on every worker.

    Created once (a new dataset per epoch would re-trace the step); a resumed run skips the
    `skip` steps it has done, so it sees exactly the batches an uninterrupted run would.
    """

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(cfg.global_batch_size)
        if cfg.objective == "scst":  # images, each sampled --scst_samples times
            ds = pipeline.reference_dataset(
                cfg.cache_dir, "train", per_replica, ctx,
                shuffle=cfg.shuffle, seed=cfg.seed, manifest=manifest)
        else:
            ds = pipeline.caption_dataset(
                cfg.cache_dir, "train", per_replica, cfg.max_len, ctx, shuffle=cfg.shuffle,
                seed=cfg.seed, manifest=manifest, captions_per_image=cfg.captions_per_image)
        per_step = ctx.num_replicas_in_sync // ctx.num_input_pipelines  # batches one step takes
        return ds.skip(skip * per_step)

    return strategy.distribute_datasets_from_function(dataset_fn)


def val_dataset(strategy, cfg: TrainConfig, manifest: dict):
    """Endless validation batches; each evaluation takes `val_steps` of them (nearly the whole
    split: the same number on every worker, as collectives need)."""

    def dataset_fn(ctx):
        return pipeline.caption_dataset(
            cfg.cache_dir, "val", ctx.get_per_replica_batch_size(cfg.global_batch_size),
            cfg.max_len, ctx, shuffle=False, manifest=manifest)

    return strategy.distribute_datasets_from_function(dataset_fn)


def val_steps(cfg: TrainConfig, manifest: dict) -> int:
    return max(1, manifest["splits"]["val"]["captions"] // cfg.global_batch_size)


def steps_per_epoch(cfg: TrainConfig, manifest: dict) -> int:
    """--steps_per_epoch, else one pass over the training captions (over the images for
    --objective scst, whose batches are images)."""
    unit = "images" if cfg.objective == "scst" else "captions"
    return cfg.steps_per_epoch or max(
        1, manifest["splits"]["train"][unit] // cfg.global_batch_size)


# --------------------------------------------------------------------------------- model

def learning_rate_schedule(cfg: TrainConfig, total_steps: int):
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` of it."""
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if cfg.warmup_steps else cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio,
        warmup_target=cfg.learning_rate if cfg.warmup_steps else None,
        warmup_steps=cfg.warmup_steps)


def make_optimizer(cfg: TrainConfig, total_steps: int):
    """AdamW that applies gradients the step has already summed over replicas."""
    class PreSummedAdamW(keras.optimizers.AdamW):
        # Keras sums gradients over replicas inside `apply_gradients`; the step has done it
        # already (to clip by the global norm and to agree on overflow), so not again.
        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

        # Keras's TensorFlow backend evaluates the learning-rate schedule again for every
        # variable it decays, so the traced step held the schedule's ops ~40 times (over half of
        # the time tracing the optimizer took). It is one value per step: evaluated once here.
        def _apply_weight_decay(self, variables):
            if self.weight_decay is None:
                return
            learning_rate = self.learning_rate

            def decay(variable):
                if self._use_weight_decay(variable):
                    variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype)
                                        * tf.cast(learning_rate, variable.dtype))

            def update_all(distribution, variables):
                for variable in variables:
                    if isinstance(variable, keras.Variable):
                        variable = variable.value  # the backing tf.Variable, as Keras does
                    distribution.extended.update(variable, decay, group=False)

            tf.__internal__.distribute.interim.maybe_merge_call(
                update_all, self._distribution_strategy, variables)

    return PreSummedAdamW(learning_rate_schedule(cfg, total_steps),
                          weight_decay=cfg.weight_decay, beta_2=0.98, epsilon=1e-9)


def build_model_and_optimizer(strategy, cfg: TrainConfig, manifest: dict, total_steps: int):
    """The captioner and its optimizer, both built inside the strategy's scope.

    The optimizer's slots are created here, before the first traced step (Adam under
    Mirrored/MultiWorker strategies fails otherwise, keras-team/keras#23085).
    """
    with strategy.scope():
        model = build_captioner(cfg.model_config(manifest),
                                token_counts=manifest["train_token_counts"])
        optimizer = make_optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
    return model, optimizer


# --------------------------------------------------------------------------------- step

def masked_sums(targets, logits, label_smoothing: float):
    """Summed token cross-entropy, token count and correct count over the targets the model
    can produce: not padding, nor [UNK] (a word outside the vocabulary, which the model is
    never to write: its pinned logit would add about 1e9 to the loss of each).

    `logits` [..., V] (any float dtype; computed in float32) have the `BANNED_IDS` pinned at
    about -1e9 by the model, so label smoothing spreads its mass over the allowed ids only:
    the target is 1 - eps on the true token plus eps / (V - banned) on each allowed id, and 0
    on a banned id (smoothing over all V ids would add eps * 1e9 * banned / V to every
    token's loss, and a gradient on the banned columns that can never be met).
    """
    logits = tf.cast(logits, tf.float32)
    banned = tf.constant(BANNED_IDS, targets.dtype)
    mask = tf.reduce_all(targets[..., None] != banned, -1)
    vocab = logits.shape[-1] or tf.shape(logits)[-1]
    ids = tf.range(vocab, dtype=targets.dtype)
    allowed = tf.reduce_all(ids[:, None] != banned, -1)
    # -sum(target * log_softmax) with the target's two parts written out; `where`, not a
    # product with 0, keeps -inf logits (float16's -1e9) off the banned and untrue columns.
    true_logit = tf.reduce_sum(tf.where(ids == targets[..., None], logits, 0.0), -1)
    loss = tf.reduce_logsumexp(logits, -1) - (1 - label_smoothing) * true_logit
    if label_smoothing:
        mean_allowed = (tf.reduce_sum(tf.where(allowed, logits, 0.0), -1)
                        / tf.reduce_sum(tf.cast(allowed, tf.float32)))
        loss -= label_smoothing * mean_allowed
    correct = tf.argmax(logits, -1, output_type=targets.dtype) == targets
    return (tf.reduce_sum(tf.where(mask, loss, 0.0)), tf.reduce_sum(tf.cast(mask, tf.float32)),
            tf.reduce_sum(tf.cast(mask & correct, tf.float32)))


def training_document_frequencies(cfg: TrainConfig, manifest: dict) -> cider.DocumentFrequencies:
    """CIDEr-D's document frequencies over every training image's references."""
    images = pipeline.reference_dataset(cfg.cache_dir, "train", 256, shuffle=False,
                                        repeat=False, manifest=manifest)
    return cider.document_frequencies(
        (cider.reference_words(refs) for batch in images
         for refs in batch["references"].numpy()), manifest["vocab_size_actual"])


def cider_reward(strategy, cfg: TrainConfig, manifest: dict, is_chief: bool) -> cider.CiderD:
    """The run's CIDEr-D: the chief counts the document frequencies once and saves them in
    the run folder (a resumed run reuses them); every worker then reads that file."""
    path = run_dir.cider_df_file(cfg.model_dir)
    if is_chief and not files.exists(path):
        files.makedirs(cfg.model_dir)
        with atomic_path(path) as tmp:
            cider.save(training_document_frequencies(cfg, manifest), tmp)
    _barrier(strategy)
    return cider.CiderD(cider.load(path))


class Stepper:
    """The compiled training and validation steps over a strategy (`reward`: the CIDEr-D of
    `--objective scst`)."""

    def __init__(self, strategy, model, optimizer, cfg: TrainConfig, precision: str,
                 xla: bool, reward: cider.CiderD | None = None):
        self.strategy, self.model, self.optimizer, self.cfg = strategy, model, optimizer, cfg
        self.reward, self.xla = reward, xla
        self.float16 = precision == "mixed_float16"
        with strategy.scope():
            sync = dict(synchronization=tf.VariableSynchronization.ON_WRITE,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, trainable=False)
            self.loss_scale = tf.Variable(cfg.initial_loss_scale if self.float16 else 1.0,
                                          dtype=tf.float32, name="loss_scale", **sync)
            self.good_steps = tf.Variable(0, dtype=tf.int64, name="good_steps", **sync)
            # --ema_decay: the averaged weights (None: off).
            self.averages = (averaging.WeightAverages(model, cfg.ema_decay) if cfg.ema_decay
                             else None)
        stem = model.stem.trainable_variables if model.stem is not None else []
        self.stem_variables = list(stem)
        self.head_variables = [v for v in model.trainable_variables
                               if not any(v is s for s in stem)]
        position = {id(v): i for i, v in enumerate(self.stem_variables + self.head_variables)}
        self.model_order = [position[id(v)] for v in model.trainable_variables]
        compile_ = ((lambda f: traced(f, jit_compile=True)) if xla
                    else (lambda f: f))
        self.cross_entropy_head = compile_(self._cross_entropy_head)
        self.policy_gradient_head = compile_(self._policy_gradient_head)  # sampling: plain
        self.train_step = traced(self._train_step)
        self.eval_step = traced(self._eval_step)

    def _features(self, batch):
        features = batch["features"]
        return tf.zeros_like(features) if self.cfg.zero_features else features

    def _inputs(self, batch):
        tokens = batch["tokens"]
        inputs = {"features": self._features(batch), "tokens": tokens[:, :-1]}
        if "image_index" in batch:
            inputs["image_index"] = batch["image_index"]
        return inputs, tokens[:, 1:]

    def _with_stem(self, head, features, *args):
        """Gradients for `model.trainable_variables` in order, and `head`'s statistics.

        `head(grid, *args)` returns the gradients of `grid` and of `head_variables` first.
        The stem (`flat_grid`) runs before it, outside XLA even with --xla: XLA's CPU
        convolutions (forward and backward) measured 1.5-2x slower than TensorFlow's own.
        """
        with tf.GradientTape() as tape:
            grid = self.model.flat_grid(features)
        grads, *statistics = head(grid, *args)
        if self.stem_variables:
            grid_grad, grads = grads[0], grads[1:]
            grads = tape.gradient(grid, self.stem_variables, output_gradients=grid_grad) + grads
        return [grads[i] for i in self.model_order], *statistics

    def _head_sources(self, grid):
        return ([grid] if self.stem_variables else []) + self.head_variables

    def forward_backward(self, batch, loss_scale, seed):
        """One replica's summed loss and its gradients; `seed` hashes the dropout masks.

        The gradient is of `loss_sum * loss_scale / capacity`, where `capacity` (the batch's
        token slots) is the same on every replica: the replicas' gradients still add up, and
        float16 gradients stay per-token sized instead of growing with the batch.
        """
        inputs, targets = self._inputs(batch)
        features = inputs.pop("features")
        return self._with_stem(self.cross_entropy_head, features, inputs, targets, loss_scale,
                               seed)

    def _cross_entropy_head(self, grid, inputs, targets, loss_scale, seed):
        """`forward_backward` after the stem (XLA-compiled with --xla)."""
        capacity = tf.cast(tf.size(targets), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(grid)
            logits = self.model({**inputs, "grid": grid}, training=True, seed=seed)
            loss_sum, count, correct = masked_sums(targets, logits, self.cfg.label_smoothing)
            scaled = loss_sum * (loss_scale / capacity)
        grads = tape.gradient(scaled, self._head_sources(grid))
        return grads, loss_sum, count, capacity, {"accuracy": (correct, count)}

    def _scst_forward_backward(self, batch, loss_scale, step):
        """One replica's self-critical gradient: sample, reward, baseline, policy gradient.

        Each image's k samples are seeded from (--seed, step, image id, sample index), so they
        do not depend on which replica holds the image, and a resumed run draws them again.
        """
        cfg, k = self.cfg, self.cfg.scst_samples
        features = self._features(batch)
        images = tf.shape(features)[0]
        index = tf.repeat(tf.range(images, dtype=tf.int32), k)
        keys = tf.strings.join([tf.repeat(batch["image_id"], k),
                                tf.strings.as_string(tf.tile(tf.range(k), [images])),
                                tf.strings.as_string(step), str(cfg.seed)], "/")
        seeds = tf.strings.to_hash_bucket_fast(keys, 2 ** 62)
        length = cfg.max_len - 1  # tokens after [START], as cross-entropy trains
        tokens = sample_decode(self.model, tf.gather(features, index), length, 1.0,
                               seeds)["tokens"]
        references = cider.words(batch["references"])
        reward = self.reward(cider.words(tokens), tf.gather(references, index))
        ratios = {"reward": (tf.reduce_sum(reward), tf.cast(tf.size(reward), tf.float32))}
        if cfg.scst_baseline == "greedy":
            greedy = self.reward(cider.words(greedy_decode(self.model, features,
                                                           length)["tokens"]), references)
            baseline = tf.gather(greedy, index)
            ratios["greedy_reward"] = (tf.reduce_sum(greedy), tf.cast(images, tf.float32))
        else:  # the mean of the image's other samples
            per_image = tf.reshape(reward, [images, k])
            others = (tf.reduce_sum(per_image, 1, keepdims=True) - per_image) / (k - 1)
            baseline = tf.reshape(others, [-1])
        grads, loss_sum, count, capacity = self._with_stem(
            self.policy_gradient_head, features, index, tokens,
            tf.stop_gradient(reward - baseline), loss_scale)
        return grads, loss_sum, count, capacity, ratios

    def _policy_gradient_head(self, grid, index, tokens, advantage, loss_scale):
        """Gradient of -sum(advantage * log p(sampled token)) over the sampled tokens (teacher
        forced on the samples; [END] included with --scst_end_token), scaled like
        `forward_backward`'s; the part after the stem (XLA-compiled with --xla)."""
        inputs = {"grid": grid, "image_index": index,
                  "tokens": tf.concat([tf.fill([tf.shape(tokens)[0], 1], START_ID),
                                       tokens[:, :-1]], axis=1)}
        mask = tokens != 0
        if not self.cfg.scst_end_token:
            mask = tf.logical_and(mask, tokens != END_ID)
        mask = tf.cast(mask, tf.float32)
        capacity = tf.cast(tf.size(tokens), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(grid)
            # The samples came from the model without dropout: their log-probabilities too.
            logits = self.model(inputs, training=False)
            log_probs = tf.gather(tf.nn.log_softmax(logits), tokens, batch_dims=2)
            loss_sum = -tf.reduce_sum(advantage[:, None] * log_probs * mask)
            scaled = loss_sum * (loss_scale / capacity)
        grads = tape.gradient(scaled, self._head_sources(grid))
        return grads, loss_sum, tf.reduce_sum(mask), capacity

    def _replica_step(self, batch, stop, step):
        """Gradients and statistics summed over all replicas (one all-reduce)."""
        ctx = tf.distribute.get_replica_context()
        if self.cfg.objective == "scst":
            grads, loss_sum, count, capacity, ratios = self._scst_forward_backward(
                batch, self.loss_scale, step)
        else:
            # Dropout masks from (--seed, step, replica): a resumed run draws them again.
            seed = dropout_seed(self.cfg.seed, step, ctx.replica_id_in_sync_group)
            grads, loss_sum, count, capacity, ratios = self.forward_backward(
                batch, self.loss_scale, seed)
        names = sorted(ratios)
        sums = [loss_sum, count, stop] + [v for n in names for v in ratios[n]]
        # tf.identity places each value on this replica's device (`stop` comes from the host).
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                [tf.identity(v) for v in list(grads) + sums])
        grads, (loss_sum, count, stop, *ratio_sums) = summed[:-len(sums)], summed[-len(sums):]
        grads = [g * (capacity / (count * self.loss_scale)) for g in grads]
        norm = tf.linalg.global_norm(grads)
        if self.cfg.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, self.cfg.clip_norm, use_norm=norm)
        stats = {"loss": loss_sum / count, "grad_norm": norm, "stop": stop, "tokens": count}
        stats.update({n: ratio_sums[2 * i] / ratio_sums[2 * i + 1]
                      for i, n in enumerate(names)})
        return grads, stats

    def _apply(self, grads):
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        if self.averages is not None:
            self.averages.update(self.model)
        if self.float16:
            # This is the 2,000th clean step in a row: double (as Keras' LossScaleOptimizer).
            grow = self.good_steps + 1 >= 2000
            self.loss_scale.assign(tf.where(grow, self.loss_scale * 2, self.loss_scale))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64),
                                            self.good_steps + 1))

    def _skip(self):
        if self.float16:
            self.loss_scale.assign(tf.maximum(self.loss_scale / 2, 1.0))
            self.good_steps.assign(0)

    def _train_step(self, iterator, stop, step=0):
        grads, stats = self.strategy.run(self._replica_step,
                                         args=(next(iterator), stop, tf.cast(step, tf.int64)))
        stats = {k: self.strategy.experimental_local_results(v)[0] for k, v in stats.items()}
        # The summed gradient is the same on every replica, so is this decision: a float16
        # overflow on any one replica skips the step on all of them.
        stats["applied"] = tf.math.is_finite(stats["grad_norm"])

        def apply():
            self.strategy.run(self._apply, args=(grads,))
            return tf.constant(True)

        def skip():
            self.strategy.run(self._skip)
            return tf.constant(False)

        tf.cond(stats["applied"], apply, skip)
        return stats

    def _eval_step(self, iterator):
        def replica(batch):
            inputs, targets = self._inputs(batch)
            logits = self.model(inputs, training=False)
            sums = masked_sums(targets, logits, 0.0)
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, list(sums))

        out = self.strategy.run(replica, args=(next(iterator),))
        return [self.strategy.experimental_local_results(v)[0] for v in out]


# --------------------------------------------------------------------------------- checkpoints

class Checkpoints:
    """Latest and best checkpoints; only the chief writes to `model_dir`.

    Saving is a collective under MultiWorkerMirroredStrategy, so every worker saves: the
    others into a temporary folder they delete.
    """

    def __init__(self, checkpoint, model_dir: str, is_chief: bool, keep: int,
                 workers: int = 1):
        self.workers = workers
        self.scratch = None if is_chief else tempfile.mkdtemp(prefix="dist_caption_ckpt_")
        self.chief_dir = run_dir.checkpoints_dir(model_dir)
        root = model_dir if is_chief else self.scratch
        self.latest = tf.train.CheckpointManager(checkpoint, run_dir.checkpoints_dir(root),
                                                 max_to_keep=keep)
        self.best = tf.train.CheckpointManager(checkpoint, run_dir.best_dir(root),
                                               max_to_keep=1)
        self.checkpoint = checkpoint

    def restore(self) -> str | None:
        """Every worker restores the chief's latest checkpoint (the model_dir is shared)."""
        path = tf.train.latest_checkpoint(self.chief_dir)
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int, best: bool = False) -> None:
        """Writes the step's checkpoint; a failed write (disk full, read-only folder) is a
        `UserError` and leaves the previous checkpoint as the one a re-run restores."""
        for manager in (self.latest, self.best) if best else (self.latest,):
            try:
                manager.save(checkpoint_number=step)
            except (OSError, tf.errors.OpError) as e:
                if self.workers > 1 and isinstance(e, PEER_ERRORS):
                    raise  # a peer was lost during the save's collective: not a disk's fault
                reason = getattr(e, "strerror", None) or getattr(e, "message", str(e))
                previous = tf.train.latest_checkpoint(self.latest.directory)
                raise UserError(
                    f"could not write the step-{step} checkpoint in {manager.directory} "
                    f"({reason.splitlines()[0]}): free space or make --model_dir writable; "
                    + (f"{previous} is intact and a re-run resumes from it" if previous
                       else "no earlier checkpoint exists")) from None

    def close(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


# --------------------------------------------------------------------------------- evaluation

def evaluate_epoch(strategy, stepper: Stepper, cfg: TrainConfig, manifest: dict, iterator,
                   workers: int, is_chief: bool, model) -> dict:
    """Validation loss/accuracy (all workers) and caption metrics (chief, then shared)."""

    loss = count = correct = 0.0
    for _ in range(val_steps(cfg, manifest)):
        l, n, c = (float(v) for v in stepper.eval_step(iterator))
        loss, count, correct = loss + l, count + n, correct + c
    metrics = {"val_loss": loss / count, "val_accuracy": correct / count}
    names = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "scene_accuracy"]
    values = [0.0] * len(names)
    if cfg.eval_images:
        if is_chief:
            predictions, references = evaluation.caption_split(
                model, cfg.cache_dir, "val", cfg.max_len, limit=cfg.eval_images,
                zero_features=cfg.zero_features, manifest=manifest, xla=stepper.xla)
            scores = evaluation.score(predictions, references, manifest)
            values = [scores.get(n, -1.0) for n in names]
            metrics["samples"] = list(predictions.items())[:4]
        # The chief's numbers reach every worker, so all take the same early-stopping branch.
        local_replicas = strategy.num_replicas_in_sync // workers
        shared = _all_sum(strategy, tf.constant(values, tf.float32) / local_replicas)
        metrics.update({n: float(v) for n, v in zip(names, shared.numpy()) if v >= 0})
    return metrics


# --------------------------------------------------------------------------------- loop

# What a collective or the coordination service raises when a peer died, stalled or was cut
# off (or this worker's link to it went down): UnavailableError (connection reset, "tasks are
# unhealthy"), AbortedError and CancelledError (collectives aborted after a peer's error),
# DeadlineExceededError (--collective_timeout), InternalError (a coordination service error
# relayed to this worker).
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError, tf.errors.InternalError)


def run(cfg: TrainConfig) -> dict:
    """Trains (or resumes) the run in `cfg.model_dir`; returns the last epoch's metrics.

    With several workers, a worker that loses a peer exits `PEER_LOST` (43), printing
    `PEER_LOST_LINE` and its traceback: its state is fine, and restarting the whole group
    resumes from the last checkpoint.
    """
    tf.get_logger().setLevel("WARNING")  # absl logs ours; TensorFlow's INFO is noise here
    strategy = make_strategy(cfg.strategy, cfg.cpu_devices, ClusterTimeouts(
        cfg.heartbeat_timeout, cfg.collective_timeout))
    # From here on SIGTERM (preemption) means: checkpoint at the next step on every worker.
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    worker, workers = worker_info(strategy)
    on_exit: list = []
    # --precision applies to this run only: a model built later in this process (an export,
    # an evaluation) gets Keras' policy as it was, as it would in a process of its own.
    policy = keras.mixed_precision.global_policy()
    try:
        return _train(strategy, cfg, worker, workers, stop_requested, on_exit)
    except PEER_ERRORS as e:
        if workers == 1:
            raise
        for close in on_exit:
            close()
        _exit_peer_lost(e)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _exit_peer_lost(error: Exception) -> None:
    """Exits `PEER_LOST` at once: one line saying so, then the traceback (for the log file).
    Not a normal exit: TensorFlow's shutdown would wait for the lost peer."""
    lines = [l.strip() for l in (getattr(error, "message", "") or str(error)).splitlines()]
    # TensorFlow's message starts with where the op was defined; say what happened instead.
    said = [l for l in lines if l and not l.startswith(("Graph execution error", "Detected at",
                                                        "File ", "[[", "The error could"))]
    print(f"{PEER_LOST_LINE} {type(error).__name__}: {said[0] if said else ''}; this "
          f"worker's state is fine: exiting {PEER_LOST} (restart the group to resume from the "
          f"last checkpoint)", file=sys.stderr, flush=True)
    traceback.print_exc()
    sys.stdout.flush()
    console.release_stderr()
    os._exit(PEER_LOST)


def _train(strategy, cfg: TrainConfig, worker: int, workers: int, stop_requested: list,
           on_exit: list) -> dict:
    """`run` once the strategy is made; `on_exit` gets what to clean up on a lost peer."""
    is_chief = worker == 0
    if not is_chief:
        logging.set_verbosity(logging.WARNING)
    manifest = pipeline.load_manifest(cfg.cache_dir)
    if is_chief:  # the shards are shared: checking them once is enough (the others wait below)
        pipeline.split_files(cfg.cache_dir, manifest, "train", verify=True)
    precision, xla = choose_precision_and_xla(cfg.precision, cfg.xla, local_gpus(),
                                               cfg.cpu_devices)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(cfg.seed)
    spe = steps_per_epoch(cfg, manifest)
    total_steps = spe * cfg.epochs  # the schedule ignores max_steps: a stop is not a shorter run
    replicas = strategy.num_replicas_in_sync
    error = config.batch_split_error(cfg, replicas)
    if error:
        raise UserError(error)
    init_checkpoint = check_objective(cfg, manifest)

    model, optimizer = build_model_and_optimizer(strategy, cfg, manifest, total_steps)
    # Loop state, identical on every worker: plain variables, outside the strategy.
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="best")
    bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
    reward = cider_reward(strategy, cfg, manifest, is_chief) if cfg.objective == "scst" \
        else None
    stepper = Stepper(strategy, model, optimizer, cfg, precision, xla, reward)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, epoch=epoch_var,
                               best=best, bad_epochs=bad_epochs,
                               loss_scale=stepper.loss_scale, good_steps=stepper.good_steps,
                               **({averaging.CHECKPOINT_KEY: stepper.averages}
                                  if stepper.averages is not None else {}))
    checkpoints = Checkpoints(ckpt, cfg.model_dir, is_chief, cfg.keep_checkpoints, workers)
    on_exit.append(checkpoints.close)
    restored = checkpoints.restore()
    if init_checkpoint and not restored:  # a new stage: the weights (averaged, if kept) only
        run_dir.restore_weights(model, init_checkpoint, run_dir.load(cfg.init_from))
        if stepper.averages is not None:  # this stage's average starts from them
            stepper.averages.start_from(model)
    if is_chief:
        run_dir.write(cfg, manifest, model.config)
        logging.info("%s: %d worker(s), %d replica(s), %s, xla=%s; %d steps/epoch; %s",
                     type(strategy).__name__, workers, replicas, precision, xla, spe,
                     f"resumed from {restored} at step {int(step)}" if restored else
                     f"{cfg.objective} from {init_checkpoint}" if init_checkpoint else "fresh")
    _barrier(strategy)  # every worker has joined: tell the launcher
    ready = os.environ.get(READY_FILE_ENV)
    if ready:
        open(ready, "a").close()

    writer = tf.summary.create_file_writer(run_dir.logs_dir(cfg.model_dir)) if is_chief \
        else tf.summary.create_noop_writer()
    metrics: dict = {}
    minimise = cfg.early_stopping_metric == "val_loss"

    batches = iter(train_dataset(strategy, cfg, manifest, skip=int(step)))
    val_batches = iter(val_dataset(strategy, cfg, manifest))
    while int(epoch_var) < cfg.epochs and (not cfg.max_steps or int(step) < cfg.max_steps):
        epoch = int(epoch_var)
        skip = int(step) - epoch * spe
        progress = Progress(f"epoch {epoch + 1}/{cfg.epochs}", total=spe, unit="steps",
                            stream=None if is_chief else open(os.devnull, "w"))
        progress.done = skip
        started, seen = time.perf_counter(), 0
        unit = "images" if cfg.objective == "scst" else "captions"
        for _ in range(spe - skip):
            if cfg.max_steps and int(step) >= cfg.max_steps:
                break
            out = stepper.train_step(batches, tf.constant(float(bool(stop_requested))),
                                     tf.constant(int(step), tf.int64))
            step.assign_add(1)
            seen += cfg.global_batch_size
            rate = seen / (time.perf_counter() - started)
            progress.update(1, f"{step_summary(out)} {rate:,.0f} {unit}/s")
            if is_chief and int(step) % cfg.log_every == 0:
                with writer.as_default(step=int(step)):
                    for name, value in out.items():  # loss, grad_norm, accuracy or reward
                        if name not in ("stop", "applied", "tokens"):
                            tf.summary.scalar(f"train/{name}", value)
                    tf.summary.scalar("train/learning_rate",
                                      optimizer.learning_rate)
                    tf.summary.scalar("train/examples_per_second", rate)
                    tf.summary.scalar("train/loss_scale", stepper.loss_scale)
            if float(out["stop"]) > 0:
                checkpoints.save(int(step))
                logging.warning("SIGTERM: checkpointed step %d; exiting %d", int(step),
                                PREEMPTED)
                checkpoints.close()
                writer.close()
                _leave_cluster(strategy, workers, PREEMPTED)
            if cfg.checkpoint_every and int(step) % cfg.checkpoint_every == 0:
                checkpoints.save(int(step))
        progress.close()
        if int(step) < (epoch + 1) * spe:  # max_steps reached mid-epoch
            checkpoints.save(int(step))
            break
        epoch_var.assign_add(1)
        with (stepper.averages.swapped_in(model) if stepper.averages is not None
              else contextlib.nullcontext()):
            metrics = evaluate_epoch(strategy, stepper, cfg, manifest, val_batches, workers,
                                     is_chief, model)
        value = (-metrics["val_loss"] if minimise or cfg.early_stopping_metric not in metrics
                 else metrics[cfg.early_stopping_metric])
        improved = value > float(best)
        if improved:
            best.assign(value)
            bad_epochs.assign(0)
        else:
            bad_epochs.assign_add(1)
        checkpoints.save(int(step), best=improved)
        if is_chief:
            _log_epoch(writer, int(step), epoch, metrics)
        if cfg.patience and int(bad_epochs) >= cfg.patience:
            logging.info("early stopping: %s has not improved for %d epochs",
                         cfg.early_stopping_metric, cfg.patience)
            break
    checkpoints.close()
    writer.close()
    _leave_cluster(strategy, workers, 0)
    return metrics


def step_summary(out: dict) -> str:
    """The console's words for a step's statistics: the loss, or with SCST the mean reward
    of the samples (and of the greedy baseline's captions), which says more than its loss."""
    if "reward" not in out:
        return f"loss {float(out['loss']):.3f}"
    greedy = f" (greedy {float(out['greedy_reward']):.3f})" if "greedy_reward" in out else ""
    return f"reward {float(out['reward']):.3f}{greedy} loss {float(out['loss']):.3f}"


def check_objective(cfg: TrainConfig, manifest: dict) -> str | None:
    """The --init_from checkpoint (checked, see `run_dir.check_init`), or None. The rules
    across settings (`config.TRAIN_RULES`) are checked again here for callers without flags."""
    try:
        declaring.check(cfg, config.TRAIN_RULES)
    except ValueError as e:
        raise UserError(str(e)) from None
    return run_dir.check_init(cfg, manifest) if cfg.init_from else None


def _all_sum(strategy, value):
    """`value` (the same on each of this worker's replicas) summed over all replicas; in a
    tf.function, as collectives run eagerly are slow (and TensorFlow warns about each)."""
    return _all_sum_function(strategy)(tf.convert_to_tensor(value))


@functools.lru_cache(maxsize=None)
def _all_sum_function(strategy):
    """One traced all-reduce per strategy (a new tf.function per call would retrace each time,
    and TensorFlow warns about every retrace)."""
    @traced
    def reduce(value):
        return strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(tf.identity, args=(value,)), axis=None)

    return reduce


def _barrier(strategy) -> None:
    """A collective every worker must reach."""
    _all_sum(strategy, tf.constant(1.0))


def _leave_cluster(strategy, workers: int, code: int) -> None:
    """Ends this worker's part of the run; with several workers, all leave at once.

    A worker process that simply returns waits at exit for its peers' heartbeats, and the
    coordination service reports those that left first as crashed (a minute later, with a
    frightening log). So: one last barrier, then every worker exits immediately, together.
    A collective's data is pulled: a worker done with the barrier may leave while a peer still
    reads its part (seen as "Socket closed" on a busy machine). So a second barrier keeps
    each worker until all have the first; it may fail, harmlessly: a peer that left had
    completed it, which needs this worker's part, sent only once this worker had the first.
    """
    _barrier(strategy)
    if workers > 1:
        try:
            _barrier(strategy)
        except tf.errors.OpError:  # e.g. UnavailableError: Socket closed
            pass
        sys.stdout.flush()
        console.release_stderr()
        os._exit(code)
    if code:
        raise SystemExit(code)


def _log_epoch(writer, step: int, epoch: int, metrics: dict) -> None:


    samples = metrics.pop("samples", [])
    numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
    logging.info("epoch %d: val_loss %.3f val_accuracy %.3f %s", epoch + 1,
                 numbers["val_loss"], numbers["val_accuracy"],
                 format_metrics({k: v for k, v in numbers.items()
                                 if not k.startswith("val_")}))
    for image_id, caption in samples:
        logging.info("  %s: %s", image_id, caption)
    with writer.as_default(step=step):
        for name, value in numbers.items():
            tf.summary.scalar(f"val/{name}", value)
        tf.summary.text("val/samples", "\n\n".join(f"{i}: {c}" for i, c in samples))
    writer.flush()


def logged_scalars(model_dir: str, tag: str) -> dict[int, float]:
    """step -> the value of the scalar `tag` (e.g. train/loss) in the run's TensorBoard logs."""

    out = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(run_dir.logs_dir(model_dir), "events.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return out
