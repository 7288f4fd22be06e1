"""The whole path (extract -> train -> evaluate -> export) on a local folder and on ram://.

`ram://` is TensorFlow's in-memory filesystem: it goes through the same tf.io.gfile layer as
gs:// and s3://, so a path that works there works wherever a local path does. It lives in one
process, so these tests run everything in-process.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from dist_caption import evaluation, exporting, run_dir, training
from dist_caption.data import cache, pipeline, sources
from dist_caption.data.records import LoadReport
from dist_caption.files import read_json, writable_file, write_json_atomic
from serving.local_server.loading import version_folders


# On ram:// only: the local disk is where every other test caches, trains and exports.
@pytest.mark.parametrize("storage", ["ram"], indirect=True)
@pytest.mark.slow
def test_cache_run_folder_and_export_work_on_any_storage(storage, tmp_path):
    synthetic_dir = str(tmp_path / "synthetic")
    records = sources.synthetic_records(synthetic_dir, 40, 0, 64, LoadReport())
    cache_dir, model_dir = f"{storage}/cache", f"{storage}/run"
    cache.extract(records, cache_dir, cache.ExtractionSettings(
        "synthetic", "patches", "none", shard_size=16), source={"synthetic_dir": synthetic_dir})
    training.run(training.TrainConfig(cache_dir=cache_dir, model_dir=model_dir,
                                **{**TINY, "steps_per_epoch": 4}))

    run = run_dir.load(model_dir)
    assert run["cache_dir"] == (cache_dir if "://" in cache_dir else os.path.abspath(cache_dir))
    assert run_dir.vocabulary(model_dir).sha256 == run["vocab_sha256"]
    assert tf.train.latest_checkpoint(run_dir.checkpoints_dir(model_dir)).endswith("ckpt-4")
    assert sorted(training.logged_scalars(model_dir, "train/loss")) == [1, 2, 3, 4]

    model, _ = run_dir.restore(model_dir, "latest")
    predictions, references = evaluation.caption_split(model, cache_dir, "test", TINY["max_len"])
    assert sorted(predictions) == sorted(references) == ["37", "38", "39", "40"]
    out = writable_file(run_dir.eval_file(model_dir, "test"), "out")
    write_json_atomic(out, {"captions": predictions})
    assert read_json(out) == {"captions": predictions}

    base = f"{storage}/exports/caption"
    first = exporting.export(model_dir, base, checkpoint="latest", max_batch=8)
    second = exporting.export(model_dir, base, checkpoint="latest", max_batch=8)
    assert (first, second) == (f"{base}/1", f"{base}/2")
    assert sorted(tf.io.gfile.listdir(base)) == ["1", "2"]  # no staging prefix left behind
    assert version_folders(base) == [1, 2]
    # The model card found the run's eval file there (written above without its split name).
    card = json.loads(tf.io.gfile.GFile(f"{second}/assets.extra/model_card.json").read())
    assert set(card["metrics"]) == {"test"} and card["checkpoint"]["step"] == 4
    served = tf.saved_model.load(second)
    batch = next(iter(pipeline.image_dataset(cache_dir, "test", 8)))
    tokens = served.caption_features(
        features=tf.cast(batch["features"], tf.float32))["tokens"].numpy()
    vocab = run_dir.vocabulary(model_dir)
    ids = [i.decode() for i in batch["image_id"].numpy()]
    np.testing.assert_array_equal([vocab.decode(t) for t in tokens],
                                  [predictions[i] for i in ids])
