"""How far the XLA-compiled step's training run moves from the plain step's, against how far
a one-ulp nudge of one layer's weights moves it: another rounding of the same run, or another
run?

    .venv/bin/python benchmarks/trajectory.py [--cache_dir data/cache/synthetic-patches]
                                              [--steps 1400]

Three runs of the quickstart's cross-entropy stage (its flags, read from launch/quickstart.sh;
the results record them as `stage`; the cache the script builds),
stepped in turns in one process from the same initial weights over the same batches: `plain`
(tf.function), `nudged` (plain, with the vocabulary logits' kernel times 1 + 1e-7 before the
first step) and `xla`. At each mark: the distance of each run's weights from `plain`'s,
relative to their norm, and each run's mean training loss over the last 100 steps.
Writes benchmarks/results/trajectory.json.
"""

from __future__ import annotations

import argparse

from quickstart_recipe import cross_entropy_settings
from results_file import publish

# launch/quickstart.sh's cross-entropy stage (read from the script), in one process (the same
# global batch).
STAGE = dict(cross_entropy_settings(), seed=0)
MARKS = (1, 10, 30, 100, 200, 300, 500, 700, 1000, 1400, 2100, 2800, 3500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default="data/cache/synthetic-patches")
    parser.add_argument("--steps", type=int, default=1400)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from dist_caption import training
    from dist_caption.data import pipeline

    cfg = training.TrainConfig(cache_dir=args.cache_dir, model_dir="-", **STAGE)
    manifest = pipeline.load_manifest(cfg.cache_dir)
    strategy = training.make_strategy("default")
    total = cfg.epochs * cfg.steps_per_epoch
    runs = {}
    for name in ("plain", "nudged", "xla"):
        keras.utils.set_random_seed(cfg.seed)
        model, optimizer = training.build_model_and_optimizer(strategy, cfg, manifest, total)
        if name == "nudged":
            logits, = [v for v in model.trainable_variables  # names gain _1, _2 per model
                       if "/vocabulary_logits" in v.path and v.path.endswith("kernel")]
            logits.assign(logits * (1 + 1e-7))
        runs[name] = {"step": training.Stepper(strategy, model, optimizer, cfg, "float32",
                                            xla=name == "xla"),
                      "batches": iter(training.train_dataset(strategy, cfg, manifest, 0)),
                      "losses": []}

    def weights(name):
        return np.concatenate([v.numpy().ravel()
                               for v in runs[name]["step"].model.trainable_variables])

    marks, stop = [], tf.constant(0.0)
    for step in range(args.steps):
        for run in runs.values():
            out = run["step"].train_step(run["batches"], stop, tf.constant(step, tf.int64))
            run["losses"].append(float(out["loss"]))
        if step + 1 in MARKS or step + 1 == args.steps:
            plain = weights("plain")
            marks.append({
                "step": step + 1,
                "distance_from_plain": {n: float(np.linalg.norm(weights(n) - plain)
                                                 / np.linalg.norm(plain))
                                        for n in ("nudged", "xla")},
                "mean_loss_last_100": {n: float(np.mean(r["losses"][-100:]))
                                       for n, r in runs.items()}})
            print(marks[-1], flush=True)
    publish("trajectory", {"stage": STAGE, "nudge": "vocabulary_logits kernel x (1 + 1e-7)",
                           "steps": args.steps, "marks": marks,
                           "first_losses": {n: r["losses"][:3] for n, r in runs.items()}})


if __name__ == "__main__":
    main()
