"""The keras_hub backbones (vit, clip, siglip) end to end from a local preset folder, as
`--weights PRESET_DIR` is used where no preset can be downloaded (as here).

Each family's preset is a tiny randomly initialised encoder (32x32 images, 8x8 patches, one
layer, width 16) saved with keras_hub's own `save_to_preset`, with an image converter whose
per-channel scale and offset differ, so a lost or swapped normalisation shows. The tests check
that extraction writes the grid keras_hub's encoder gives on the same normalised pixels (its
class token dropped, or kept as the first cell of one row), that an export rebuilds that
encoder from the cache, runs it in-graph and captions image bytes through TensorFlow Serving's
Session path (as `test_backbones.py` does for the Keras backbones), and that a wrong `--weights`
is one line naming the problem and the fix.

Each family's preset, extraction, training and export is made once (module fixtures) and shared
by its tests. All of it is `slow`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types

import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, assert_bytes_and_cached_grids_caption_alike, assert_one_line_error,
                      make_records, tiny)
from dist_caption import exporting, training
from dist_caption.data import backbones, cache, pipeline
from dist_caption.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hub_backbones")]

SIZE, PATCH, WIDTH = 32, 8, 16
GRID = [SIZE // PATCH, SIZE // PATCH, WIDTH]  # 4 x 4 patch tokens of 16 values
# Per channel, all different: the normalisation the extraction must take from the converter.
SCALE = [1 / 127.5, 1 / 64.0, 1 / 200.0]
OFFSET = [-1.0, -0.5, 0.25]
# Images of the extraction: train, val (training needs it) and test; all are captioned.
COUNTS = (("train", 4), ("val", 1), ("test", 1))
FAMILIES = ("vit", "clip", "siglip")
HAS_CLASS_TOKEN = {"vit": True, "clip": True, "siglip": False}


def tiny_encoder(name: str):
    """A random one-layer encoder of family `name` and its image converter."""
    common = dict(patch_size=PATCH, hidden_dim=WIDTH, num_layers=1, num_heads=2)
    converter = dict(image_size=(SIZE, SIZE), scale=SCALE, offset=OFFSET)
    if name == "vit":
        return (keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), mlp_dim=32, **common),
                keras_hub.layers.ViTImageConverter(**converter))
    if name == "clip":
        return (keras_hub.models.CLIPVisionEncoder(image_shape=(SIZE, SIZE, 3),
                                                   intermediate_dim=32, **common),
                keras_hub.layers.CLIPImageConverter(**converter))
    return (keras_hub.models.SigLIPVisionEncoder(image_shape=(SIZE, SIZE, 3),
                                                 intermediate_dim=32, **common),
            keras_hub.layers.SigLIPImageConverter(**converter))


def save_tiny_preset(name: str, folder: str) -> str:
    encoder, converter = tiny_encoder(name)
    encoder.save_to_preset(folder)
    converter.save_to_preset(folder)
    return folder


def direct_tokens(preset: str, image: np.ndarray) -> np.ndarray:
    """The preset's encoder tokens [n, c] for one RGB [0, 255] image at SIZE, straight from
    keras_hub (the test's own normalisation, not the package's); SigLIP's before its pooling
    head, layer by layer."""
    encoder = keras_hub.models.Backbone.from_preset(preset)
    pixels = (image * np.array(SCALE) + np.array(OFFSET)).astype(np.float32)[None]
    if isinstance(encoder, keras_hub.models.SigLIPVisionEncoder):
        x = encoder.embedding(pixels)
        for block in encoder.encoder_layers:
            x = block(x)
        return np.asarray(encoder.post_layer_norm(x))[0]
    return np.asarray(encoder(pixels if isinstance(encoder, keras_hub.models.ViTBackbone)
                              else {"images": pixels}))[0]


def cached_grids(cache_dir: str, manifest: dict) -> dict[str, np.ndarray]:
    """image path -> its grid as stored (float16 -> float32)."""
    shape = manifest["feature_shape"]
    found = {}
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            for raw in tf.data.TFRecordDataset(os.path.join(cache_dir, shard["file"])):
                example = tf.io.parse_single_example(raw, cache.FEATURE_SPEC)
                data = example["features"].numpy()
                assert len(data) == np.prod(shape) * 2, (len(data), shape)
                found[example["image_path"].numpy().decode()] = (
                    np.frombuffer(data, np.float16).reshape(shape).astype(np.float32))
    return found


def digests(arrays) -> list[str]:
    return sorted(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """A tiny preset folder of every family."""
    root = tmp_path_factory.mktemp("presets")
    return {name: save_tiny_preset(name, str(root / name)) for name in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, presets, tmp_path_factory):
    """One family's preset, a few tiny JPEGs and their cache, extracted with the class token
    dropped through the normal extraction path."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    records = make_records(str(root / "images"), COUNTS, size=(48, 40))
    cache_dir = str(root / "cache")
    manifest = cache.extract(records, cache_dir, cache.ExtractionSettings(
        "test", name, presets[name], shard_size=8), batch_size=4)
    return types.SimpleNamespace(name=name, root=root, preset=presets[name], records=records,
                                 cache_dir=cache_dir, manifest=manifest)


@pytest.fixture(scope="module")
def exported(family):
    """A few training steps on the family's cache, exported: the version folder."""
    model_dir = str(family.root / "run")
    training.run(tiny(family.cache_dir, model_dir))
    return exporting.export(model_dir, str(family.root / "export"), max_batch=8,
                            warmup_batch_sizes=(1,))


def test_every_keras_hub_backbone_is_covered():
    assert set(FAMILIES) == {n for n, s in backbones.BACKBONES.items() if s.presets}
    assert {n for n in FAMILIES if backbones.get_spec(n).class_token} == {
        n for n, has in HAS_CLASS_TOKEN.items() if has}


def test_extraction_writes_the_encoders_patch_tokens_as_a_grid(family):
    manifest = family.manifest
    assert manifest["feature_shape"] == GRID and manifest["input_size"] == SIZE
    assert manifest["backbone"] == family.name and manifest["weights"] == family.preset
    assert manifest["class_token"] == "drop"
    preset = manifest["preset"]
    assert preset["path"] == os.path.abspath(family.preset) and preset["name"] == family.name
    assert (preset["scale"], preset["offset"]) == (SCALE, OFFSET)
    assert preset["class_token"] == ("dropped" if HAS_CLASS_TOKEN[family.name] else
                                     "none (the encoder has no class token)")
    # The cache holds the encoder as a keras_hub preset, its weights those of the folder given.
    stored = os.path.join(family.cache_dir, cache.BACKBONE_PRESET)
    assert digests(w.numpy() for w in keras_hub.models.Backbone.from_preset(stored).weights) \
        == digests(w.numpy() for w in keras_hub.models.Backbone.from_preset(family.preset)
                   .weights)

    grids = cached_grids(family.cache_dir, manifest)
    assert set(grids) == {r.image_path for r in family.records}
    skip = 1 if HAS_CLASS_TOKEN[family.name] else 0
    for path, grid in grids.items():
        image = backbones.decode_image(tf.io.read_file(path), SIZE).numpy()
        tokens = direct_tokens(family.preset, image)
        assert tokens.shape == (skip + GRID[0] * GRID[1], WIDTH)
        want = tokens[skip:].reshape(GRID)  # the patch tokens, row by row
        np.testing.assert_allclose(grid, want, rtol=1e-2, atol=1e-3 * np.abs(want).max(),
                                   err_msg=path)
    stacked = np.stack(list(grids.values()))  # they depend on the image
    assert np.abs(stacked - stacked[0]).max() > 0.1 * np.abs(stacked).max()
    for batch in pipeline.image_dataset(family.cache_dir, "test", batch_size=4):
        assert batch["features"].shape[1:] == GRID


@pytest.mark.setting("class_token")
def test_class_token_keep_makes_one_row_with_the_class_token_first(family):
    settings = cache.ExtractionSettings("test", family.name, family.preset, shard_size=8,
                                        class_token="keep")
    cache_dir = str(family.root / "cache-keep")
    if not HAS_CLASS_TOKEN[family.name]:
        with pytest.raises(UserError) as caught:
            cache.extract(family.records, cache_dir, settings)
        message = str(caught.value)
        assert "\n" not in message and message == (
            f"--class_token keep: {family.name} has no class token (vit and clip have one): "
            "leave --class_token at drop")
        return
    manifest = cache.extract(family.records, cache_dir, settings, batch_size=4)
    cells = 1 + GRID[0] * GRID[1]
    assert manifest["feature_shape"] == [1, cells, WIDTH]
    assert manifest["class_token"] == "keep"
    assert manifest["preset"]["class_token"] == "kept as the first cell of one row"
    kept, dropped = (cached_grids(cache_dir, manifest),
                     cached_grids(family.cache_dir, family.manifest))
    for path, row in kept.items():
        image = backbones.decode_image(tf.io.read_file(path), SIZE).numpy()
        tokens = direct_tokens(family.preset, image)
        np.testing.assert_allclose(row[0], tokens, rtol=1e-2,
                                   atol=1e-3 * np.abs(tokens).max(), err_msg=path)
        # The same patch tokens as the dropped grid, after the class token.
        np.testing.assert_array_equal(row[0, 1:], dropped[path].reshape(-1, WIDTH))
    # The export rebuilds each cache's backbone with its own rule.
    assert cache.load_backbone(cache_dir, family.name).output_shape == (None, 1, cells, WIDTH)
    assert cache.load_backbone(family.cache_dir, family.name).output_shape == (None, *GRID)


def test_the_export_runs_the_preset_in_graph_and_captions_through_the_session_path(
        family, exported):
    paths = [r.image_path for r in family.records]
    loaded = tf.saved_model.load(exported)
    # The export carries the preset's encoder weights (SigLIP's without its unused head).
    preset_weights = digests(w.numpy() for w in
                             keras_hub.models.Backbone.from_preset(family.preset).weights)
    exported_weights = digests(v.numpy() for v in loaded.backbone_variables)
    assert exported_weights and set(exported_weights) <= set(preset_weights)
    rebuilt = cache.load_backbone(family.cache_dir, family.name)
    assert exported_weights == digests(v.numpy() for v in rebuilt.variables)

    # TensorFlow Serving's loading path: bytes through the in-graph encoder (decoding,
    # normalisation, encoder, grid) caption as the cached grids do.
    served = assert_bytes_and_cached_grids_caption_alike(
        exported, family.cache_dir, family.manifest, paths, loaded)

    # The export decodes at the preset's size, and attends over its grid.
    with open(os.path.join(exported, exporting.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert (metadata["backbone"], metadata["image_size"]) == (family.name, SIZE)
    assert metadata["model"]["feature_shape"] == GRID
    # Its model card names the preset and the class-token rule, as the cache's manifest does.
    with open(os.path.join(exported, exporting.MODEL_CARD_FILE)) as f:
        card = json.load(f)["backbone"]
    assert (card["name"], card["weights"]) == (family.name, family.preset)
    assert card["preset"] == family.manifest["preset"] and card["class_token"] == "drop"
    assert served["attention"].shape[0] == len(paths)
    assert served["attention"].shape[-1] == GRID[0] * GRID[1]


def test_a_wrong_weights_is_one_line_naming_the_problem_and_the_fix(presets, tmp_path):
    weights_file = str(tmp_path / "some.weights.h5")
    open(weights_file, "wb").close()
    empty = tmp_path / "empty"
    empty.mkdir()
    fetch = "save_to_preset('DIR')\""
    cases = [  # (backbone, --weights, what the line starts with, what it also says)
        ("vit", "imagenet", "--backbone vit needs --weights PRESET_DIR, a local keras_hub "
         "preset folder, not imagenet", "from_preset('vit_base_patch16_224_imagenet')"),
        ("clip", "none", "--backbone clip needs --weights PRESET_DIR", "clip_vit_base_patch16"),
        ("clip", weights_file, f"--weights {weights_file}: not a folder; --backbone clip needs "
         "a local keras_hub preset folder", fetch),
        ("siglip", str(empty), f"--weights {empty}: no config.json, so not a keras_hub preset "
         "folder", "siglip_base_patch16_224"),
        ("clip", presets["vit"], f"--weights {presets['vit']}: a keras_hub preset of "
         "ViTBackbone, not of clip (CLIPVisionEncoder or CLIPBackbone): pass a clip preset "
         "folder", fetch),
        ("vit", presets["siglip"], f"--weights {presets['siglip']}: a keras_hub preset of "
         "SigLIPVisionEncoder, not of vit (ViTBackbone)", fetch),
    ]
    for name, weights, start, also in cases:
        with pytest.raises(UserError) as caught:
            backbones.build_backbone(name, weights)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(start) and also in message, message

    # From the command line: one `error:` line, before any image is read.
    synthetic = ["--num_images=6", "--image_size=32", "--synthetic_seed=1"]
    commands = [[f"--backbone={name}", f"--weights={weights}",
                 f"--synthetic_dir={tmp_path / f'synthetic{i}'}",
                 f"--cache_dir={tmp_path / f'cache{i}'}", *synthetic]
                for i, (name, weights, _, _) in enumerate([cases[0], cases[4]])]
    commands.append(["--backbone=siglip", f"--weights={presets['siglip']}", "--class_token=keep",
                     f"--synthetic_dir={tmp_path / 'synthetic2'}",
                     f"--cache_dir={tmp_path / 'cache2'}", *synthetic])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    procs = [subprocess.Popen([sys.executable, "-m", "dist_caption.extract_features", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in commands]
    needles = [(cases[0][2],), (cases[4][2],), ("--class_token keep: siglip has no class token",)]
    for proc, needle in zip(procs, needles):
        out, err = proc.communicate(timeout=300)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                              *needle)
    assert not any(os.listdir(tmp_path / f"cache{i}") for i in range(3) if
                   os.path.isdir(tmp_path / f"cache{i}"))


def test_a_two_tower_preset_gives_its_vision_encoders_grid(tmp_path):
    """What `CLIPBackbone.from_preset('clip_vit_base_patch16').save_to_preset(DIR)` saves: the
    image and text towers; the backbone is the image tower's."""
    vision, converter = tiny_encoder("clip")
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16,
                                            num_layers=1, num_heads=2, intermediate_dim=32,
                                            max_sequence_length=8)
    both = keras_hub.models.CLIPBackbone(vision_encoder=vision, text_encoder=text,
                                         projection_dim=8)
    folder = str(tmp_path / "clip")
    both.save_to_preset(folder)
    converter.save_to_preset(folder)
    model = backbones.build_backbone("clip", folder)
    assert model.output_shape == (None, *GRID)
    assert digests(v.numpy() for v in model.variables) == digests(
        w.numpy() for w in vision.weights)
    image = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    want = np.asarray(vision({"images": (image * np.array(SCALE) + np.array(OFFSET))
                              .astype(np.float32)[None]}))[0, 1:].reshape(GRID)
    np.testing.assert_allclose(np.asarray(model(image[None]))[0], want, rtol=1e-5, atol=1e-5)
