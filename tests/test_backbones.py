"""Every Keras backbone end to end from a local weights file, as `--weights FILE` is used where
the ImageNet weights cannot be downloaded (as here): the file is loaded (not silently ignored),
a wrong file is a one-line error, extraction writes the backbone's real grid, and an export runs
that backbone with those weights in-graph and captions image bytes through TensorFlow Serving's
Session path.

The weights are random but written in the formats `keras.applications` reads for `weights=`
(what `build_backbone` passes a file to): Keras 3 `.weights.h5`, and the legacy `.h5` of the
no-top files Keras downloads (what the offline hint tells a user to fetch). They are made
usable first (see `random_no_top`): every weight moved off its initial value, so even a skipped
batch-norm statistic would show, and grids that depend on the image, so a wrong preprocessing
would show too.

Each backbone's weights file, extraction, training and export is made once (module fixtures) and
shared by its tests. All of it is `slow` (out of the development lane): building a real backbone
takes seconds, its training and export 30-40 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import types
import warnings

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format

from conftest import assert_bytes_and_cached_grids_caption_alike, make_records, tiny
from dist_caption import exporting, training
from dist_caption.data import backbones, cache, pipeline
from dist_caption.errors import UserError

# Its module fixtures are expensive (one backbone's extraction, training and export each): one
# xdist worker runs all its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("backbones")]

# (input size, feature grid) of each backbone, from the table of `data/backbones.py`: written out
# here, not computed, so a change to either is seen.
GRIDS = {
    "mobilenet_v3_small": (224, [7, 7, 576]),
    "mobilenet_v3_large": (224, [7, 7, 960]),
    "efficientnet_b0": (224, [7, 7, 1280]),
    "inception_v3": (299, [8, 8, 2048]),
    "resnet50": (224, [7, 7, 2048]),
}
# What a wrong file's error says, by format: Keras's reason, not just its summary line.
WRONG_FILE_REASONS = {
    "weights.h5": r"A total of \d+ objects could not be loaded\. Example error message for "
                  r"object <[^>]+>: \S.*\)$",
    "legacy h5": r"Layer count mismatch when loading weights from file\. Model expected \d+ "
                 r"layers, found \d+ saved layers\.\)$"}
# Images of the extraction: train, val (training needs it) and test; all are captioned.
COUNTS = (("train", 4), ("val", 1), ("test", 1))


def random_no_top(name: str, seed: int) -> keras.Model:
    """The `keras.applications` model of `name` without its top (what a `--weights` file is
    for), with random weights that make a usable backbone.

    A fresh random build is no good here: its inference-mode batch norms (mean 0, variance 1)
    let the activations fade through the depth, to grids that hardly depend on the image
    (mobilenet_v3_small's are ~1e-10, 0 in float16), so no check on features could tell one
    image, or one preprocessing, from another. So every weight is perturbed (none keeps its
    initial value: a skipped one would show), then every batch norm's statistics are set to
    those of its input on a batch of images like the tests' (one training-mode pass with
    momentum 0), so each layer's output stays near unit scale.
    """
    model = backbones.build_backbone(name, "none")
    base = model.layers[-1]
    assert isinstance(base, keras.Model) and base.name.lower().startswith(name.split("_")[0])
    rng = np.random.default_rng(seed)
    for v in base.weights:
        w = v.numpy()
        v.assign((w * rng.uniform(0.8, 1.2, w.shape) + rng.normal(0, 0.01, w.shape))
                 .astype(w.dtype))
    finalize(base)
    size = backbones.get_spec(name).size
    noise = rng.integers(0, 256, (8, 40, 48, 3)).astype(np.float32)  # as make_records' images
    images = tf.image.resize(noise, [size, size], method="bilinear", antialias=True)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    momentum = [layer.momentum for layer in norms]
    model.trainable = True
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, m in zip(norms, momentum):
        layer.momentum = m
    model.trainable = False
    return base


def save_legacy_h5(model: keras.Model, path: str) -> str:
    """`model`'s weights as a legacy Keras `.h5` file: the layout of the no-top ImageNet files
    `keras.applications` downloads (layer_names / weight_names, loaded in topological order)."""
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def no_top_values(model: keras.Model) -> list[np.ndarray]:
    """The weights of a `build_backbone` model's `keras.applications` part, in order (not its
    other variables: the random generator states of efficientnet_b0's dropouts)."""
    return [w.numpy() for w in model.layers[-1].weights]


def assert_same_values(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} weights, want {len(want)}"
    differ = [i for i, (g, w) in enumerate(zip(got, want))
              if g.shape != w.shape or not np.array_equal(g, w)]
    assert not differ, f"{what}: {len(differ)} of {len(want)} weights differ (first #{differ[0]})"


def with_values(name: str, values: list[np.ndarray]) -> keras.Model:
    """`build_backbone(name)` holding `values`, set directly: the reference the loading code
    is compared against, without going through it."""
    model = backbones.build_backbone(name, "none")
    for v, w in zip(model.layers[-1].weights, values, strict=True):
        v.assign(w)
    finalize(model.layers[-1])
    return model


def finalize(base: keras.Model) -> None:
    """What Keras's loaders do after setting a layer's weights: a `Normalization` layer
    (efficientnet_b0's) computes from its `mean` and `variance` weights the constants it uses."""
    for layer in base.layers:
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory):
    """Another backbone's weights, in both formats: mobilenet_v3_large's for
    mobilenet_v3_small, mobilenet_v3_small's for every other backbone."""
    root = tmp_path_factory.mktemp("wrong")
    made = {}

    def get(name: str) -> dict[str, str]:
        other = "mobilenet_v3_large" if name == "mobilenet_v3_small" else "mobilenet_v3_small"
        if other not in made:
            model = backbones.build_backbone(other, "none").layers[-1]  # random will do
            path = str(root / f"{other}_notop.weights.h5")
            model.save_weights(path)
            made[other] = {"weights.h5": path,
                           "legacy h5": save_legacy_h5(model, str(root / f"{other}_notop.h5"))}
        return made[other]

    return get


@pytest.fixture(scope="module", params=list(GRIDS))
def backbone(request, tmp_path_factory):
    """A random no-top weights file of one backbone, in both formats, and its values."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = random_no_top(name, seed=0)
    files = {"weights.h5": str(root / f"{name}_notop.weights.h5"),
             "legacy h5": save_legacy_h5(model, str(root / f"{name}_notop.h5"))}
    model.save_weights(files["weights.h5"])
    return types.SimpleNamespace(name=name, root=root, files=files,
                                 values=[w.numpy() for w in model.weights])


@pytest.fixture(scope="module")
def extracted(backbone):
    """The backbone's feature cache of a few tiny JPEGs, extracted with `--weights FILE`."""
    records = make_records(str(backbone.root / "images"), COUNTS, size=(48, 40))
    cache_dir = str(backbone.root / "cache")
    settings = cache.ExtractionSettings("test", backbone.name, backbone.files["weights.h5"],
                                        shard_size=8)
    manifest = cache.extract(records, cache_dir, settings, batch_size=4)
    return types.SimpleNamespace(records=records, cache_dir=cache_dir, manifest=manifest)


@pytest.fixture(scope="module")
def exported(backbone, extracted):
    """A few training steps on the cache, exported: the version folder."""
    model_dir = str(backbone.root / "run")
    training.run(tiny(extracted.cache_dir, model_dir))
    return exporting.export(model_dir, str(backbone.root / "export"), max_batch=8,
                         warmup_batch_sizes=(1,))


def test_every_keras_backbone_is_covered():
    assert set(GRIDS) == {n for n, s in backbones.BACKBONES.items() if s.application}


@pytest.mark.parametrize("fmt", ["weights.h5", "legacy h5"])
def test_a_weights_file_is_loaded_and_a_wrong_one_is_a_one_line_error(backbone, fmt,
                                                                       wrong_files):
    model = backbones.build_backbone(backbone.name, backbone.files[fmt])
    assert_same_values(no_top_values(model), backbone.values, f"--weights {fmt}")
    size, grid = GRIDS[backbone.name]
    assert model.input_shape == (None, size, size, 3)
    assert list(model.output_shape[1:]) == grid

    wrong = wrong_files(backbone.name)[fmt]
    with warnings.catch_warnings(record=True) as shown, pytest.raises(UserError) as caught:
        warnings.simplefilter("always")
        backbones.build_backbone(backbone.name, wrong)
    message = str(caught.value)
    assert message.startswith(
        f"--weights {wrong}: not a no-top weights file of {backbone.name} ("), message
    # What is wrong, on one line (the CLI prints it as its one `error:` line) ...
    assert "\n" not in message and message.endswith(")"), message
    assert re.search(WRONG_FILE_REASONS[fmt], message), message
    # ... and only that: not Keras's warning for every layer group it could not match first.
    assert not shown, (f"{len(shown)} warnings: "
                       f"{ {w.category.__name__: str(w.message)[:150] for w in shown} }")


def test_extraction_writes_the_backbones_grid_with_the_files_weights(backbone, extracted):
    size, grid = GRIDS[backbone.name]
    manifest = extracted.manifest
    assert manifest["feature_shape"] == grid and manifest["input_size"] == size
    assert manifest["backbone"] == backbone.name
    assert manifest["weights"] == backbone.files["weights.h5"]
    # The cache keeps the backbone it extracted with (export rebuilds it from there): the file's.
    stored = cache.load_backbone(extracted.cache_dir, backbone.name)
    assert_same_values(no_top_values(stored), backbone.values, "the cache's backbone")

    reference = with_values(backbone.name, backbone.values)
    by_path = {r.image_path: r for r in extracted.records}
    seen, grids = set(), []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for raw in tf.data.TFRecordDataset(os.path.join(extracted.cache_dir, shard["file"])):
                example = tf.io.parse_single_example(raw, cache.FEATURE_SPEC)
                path = example["image_path"].numpy().decode()
                data = example["features"].numpy()
                assert len(data) == np.prod(grid) * 2, (path, len(data), grid)  # float16
                features = np.frombuffer(data, np.float16).reshape(grid).astype(np.float32)
                image = backbones.decode_image(tf.io.read_file(path), size)
                want = reference(image[None], training=False).numpy()[0]
                assert want.shape == tuple(grid)
                assert np.isfinite(features).all()
                np.testing.assert_allclose(features, want, rtol=1e-2,
                                           atol=1e-3 * np.abs(want).max(), err_msg=path)
                grids.append(features)
                seen.add(path)
                assert by_path[path].split == split
    assert seen == set(by_path)
    # The grids depend on the image (so the checks on them could tell a wrong one).
    grids = np.stack(grids)
    assert np.abs(grids - grids[0]).max() > 0.1 * np.abs(grids).max()
    # ... and the pipeline the trainer reads gives the same grids.
    for batch in pipeline.image_dataset(extracted.cache_dir, "test", batch_size=4):
        assert batch["features"].shape[1:] == grid


def test_the_export_runs_the_backbone_in_graph_and_captions_through_the_session_path(
        backbone, extracted, exported):
    paths = [r.image_path for r in extracted.records]
    loaded = tf.saved_model.load(exported)
    # The export carries the weights file's backbone, every weight of it.
    # (Its variables are the backbone's weights and the generator states of its dropouts.)
    assert_same_values([v.numpy() for v in loaded.backbone_variables
                        if "seed_generator_state" not in v.name],
                       backbone.values, "the export's backbone")

    # TensorFlow Serving's loading path: bytes through the in-graph backbone caption as the
    # cached grids do.
    served = assert_bytes_and_cached_grids_caption_alike(
        exported, extracted.cache_dir, extracted.manifest, paths, loaded)

    # The export decodes at the backbone's size, and attends over the backbone's grid.
    size, (rows, cols, _) = GRIDS[backbone.name]
    with open(os.path.join(exported, exporting.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert (metadata["backbone"], metadata["image_size"]) == (backbone.name, size)
    assert metadata["model"]["feature_shape"] == GRIDS[backbone.name][1]
    assert served["attention"].shape[0] == len(paths)
    assert served["attention"].shape[-1] == rows * cols

