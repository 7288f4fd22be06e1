"""The synthetic dataset: files, determinism, layouts, and the scorer that reads captions back."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, tree_bytes
from dist_caption.data import synthetic
from dist_caption.data.text import standardize_py
from dist_caption.errors import UserError

NUM_IMAGES = 60
SPLIT_SIZES = {"train": 48, "val": 6, "test": 6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(out_dir, scenes, {image id: captions}) of one small generated dataset."""
    out_dir = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.generate(out_dir, NUM_IMAGES, seed=3, image_size=96)
    captions = {}
    for split in SPLIT_SIZES:
        with open(os.path.join(out_dir, "annotations", f"captions_{split}.json")) as f:
            for a in json.load(f)["annotations"]:
                captions.setdefault(str(a["image_id"]), []).append(a["caption"])
    return out_dir, synthetic.load_scenes(out_dir), captions


def _relation_holds(relation: str, objects: list[dict]) -> bool:
    """The relation judged from the objects' coordinates alone (y grows downwards)."""
    xs, ys = [o["x"] for o in objects], [o["y"] for o in objects]
    if relation in ("left", "middle", "right"):
        return len(objects) == 1 and int(xs[0] * 3) == ("left", "middle", "right").index(relation)
    if relation == "left_of":
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        return len(objects) == 2 and dx >= 0.3 and abs(dy) < 0.5 * dx
    if relation == "above":
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        return len(objects) == 2 and dy >= 0.3 and abs(dx) < 0.5 * dy
    return (relation == "row" and len(objects) == 3 and xs[0] + 0.2 < xs[1] < xs[2] - 0.2
            and max(ys) - min(ys) < 0.15)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic.generate(str(tmp_path / name), 12, seed=seed, image_size=64)
        runs[name] = tree_bytes(str(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert len(runs["a"]) == 12 + 3 + 2  # images, annotation files, scenes.json and DONE
    assert runs["a"]["scenes.json"] != runs["c"]["scenes.json"]
    assert runs["a"]["images/000000001.jpg"] != runs["c"]["images/000000001.jpg"]


def test_coco_files_split_80_10_10_disjoint(dataset):
    out_dir, _, _ = dataset
    seen_images, seen_annotations = set(), set()
    for split, size in SPLIT_SIZES.items():
        with open(os.path.join(out_dir, "annotations", f"captions_{split}.json")) as f:
            coco = json.load(f)
        assert set(coco) == {"info", "images", "annotations"}
        ids = {image["id"] for image in coco["images"]}
        assert len(ids) == size and not ids & seen_images
        seen_images |= ids
        for image in coco["images"]:
            assert image["file_name"] == f"{image['id']:09d}.jpg"
            assert (image["width"], image["height"]) == (96, 96)
            assert os.path.isfile(os.path.join(out_dir, "images", image["file_name"]))
        for a in coco["annotations"]:
            assert a["image_id"] in ids and a["id"] not in seen_annotations
            seen_annotations.add(a["id"])
    assert seen_images == set(range(1, NUM_IMAGES + 1))
    assert len(seen_annotations) == NUM_IMAGES * synthetic.CAPTIONS_PER_IMAGE


def _content(scene: dict) -> tuple:
    """What a caption must get right: the relation and each object's colour and shape."""
    return scene["relation"], [(o["colour"], o["shape"]) for o in scene["objects"]]


def test_captions_are_plain_distinct_and_match_only_their_scene(dataset):
    _, scenes, captions = dataset
    assert set(captions) == set(scenes)
    for image_id, texts in captions.items():
        assert len(set(texts)) == synthetic.CAPTIONS_PER_IMAGE
        for caption in texts:
            assert standardize_py(caption) == caption.replace(",", "")
            assert synthetic.caption_matches_scene(caption, scenes[image_id])
            assert synthetic.caption_matches_scene(standardize_py(caption), scenes[image_id])
            for other in scenes.values():
                if _content(other) != _content(scenes[image_id]):
                    assert not synthetic.caption_matches_scene(caption, other), (caption, other)


def test_size_words_when_present_are_true(dataset):
    _, scenes, captions = dataset
    for image_id, texts in captions.items():
        sizes = {(o["colour"], o["shape"]): o["size"] for o in scenes[image_id]["objects"]}
        for caption in texts:
            for m in synthetic.parse_caption(caption).objects:
                assert m.size in (None, sizes[m.colour, m.shape])


_FLIPS = {"on top of": "below", "left": "right", "right": "left", "above": "below",
          "below": "above", "over": "under", "under": "over", "beneath": "above",
          "middle": "left", "center": "right"}
_MENTION = re.compile(r"\ban? (?:(?:small|large) )?(%s) (%s)\b"
                      % ("|".join(synthetic.COLOURS), "|".join(synthetic.SHAPES)))


def _perturbations(caption: str) -> dict[str, str]:
    text = standardize_py(caption)
    colour, shape = _MENTION.search(text).groups()
    other_colour = next(c for c in synthetic.COLOURS if c != colour)
    other_shape = next(s for s in synthetic.SHAPES if s != shape)
    return {
        "colour": text.replace(f"{colour} {shape}", f"{other_colour} {shape}", 1),
        "shape": text.replace(f"{colour} {shape}", f"{colour} {other_shape}", 1),
        "relation": re.sub(r"\b(%s)\b" % "|".join(_FLIPS), lambda m: _FLIPS[m[1]], text),
        "missing object": _MENTION.sub("", text, count=1),
        "extra object": _MENTION.sub(lambda m: f"{m[0]} and a {other_colour} {other_shape}",
                                     text, count=1),
    }


def test_perturbed_captions_score_wrong(dataset):
    _, scenes, captions = dataset
    for image_id, texts in captions.items():
        for caption in texts:
            for kind, wrong in _perturbations(caption).items():
                assert not synthetic.caption_matches_scene(wrong, scenes[image_id]), (kind, wrong)


def test_perturbed_scenes_do_not_match(dataset):
    _, scenes, captions = dataset
    for image_id, scene in scenes.items():
        changed = []
        for key, values in (("colour", synthetic.COLOURS), ("shape", synthetic.SHAPES)):
            other = copy.deepcopy(scene)
            first = other["objects"][0]
            first[key] = next(v for v in values if v != first[key])
            changed.append(other)
        flipped = copy.deepcopy(scene)
        if len(scene["objects"]) == 1:
            flipped["relation"] = {"left": "right", "middle": "left", "right": "left"}[
                scene["relation"]]
        else:
            flipped["objects"].reverse()
        extra = copy.deepcopy(scene)
        extra["objects"].append({"colour": "red", "shape": "star", "size": "small"})
        missing = copy.deepcopy(scene)
        missing["objects"].pop()
        for caption in captions[image_id]:
            for wrong_scene in changed + [flipped, extra, missing]:
                assert not synthetic.caption_matches_scene(caption, wrong_scene)


def test_relations_agree_with_coordinates(dataset):
    _, scenes, captions = dataset
    for image_id, scene in scenes.items():
        assert _relation_holds(scene["relation"], scene["objects"]), scene
        by_name = {(o["colour"], o["shape"]): o for o in scene["objects"]}
        for caption in captions[image_id]:
            parsed = synthetic.parse_caption(caption)
            named = [by_name[m.colour, m.shape] for m in parsed.objects]
            assert _relation_holds(parsed.relation, named), caption


def test_all_layouts_occur_and_objects_are_distinct_and_apart(dataset):
    _, scenes, _ = dataset
    assert {s["relation"] for s in scenes.values()} == set(synthetic.TEMPLATES)
    for scene in scenes.values():
        objects = scene["objects"]
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        for o in objects:
            half = synthetic.SIZES[o["size"]] / 2
            assert half < o["x"] < 1 - half and half < o["y"] < 1 - half
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                reach = (synthetic.SIZES[a["size"]] + synthetic.SIZES[b["size"]]) / 2
                assert max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) > reach + 0.03


def test_images_decode_with_object_colours_at_centres(dataset):
    out_dir, scenes, _ = dataset
    palette = {name: np.array(rgb, dtype=float) for name, rgb in synthetic.COLOURS.items()}
    for image_id, scene in scenes.items():
        with Image.open(os.path.join(out_dir, "images", f"{int(image_id):09d}.jpg")) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 96)
            pixels = np.asarray(image, dtype=float)
        for o in scene["objects"]:
            pixel = pixels[int(o["y"] * 96), int(o["x"] * 96)]
            distances = {name: np.linalg.norm(pixel - rgb) for name, rgb in palette.items()}
            assert min(distances, key=distances.get) == o["colour"]
            assert distances[o["colour"]] < 60, (image_id, o, pixel)


def test_template_grammar_round_trips():
    mentions = [("a", "large", "red", "circle"), ("an", None, "orange", "square"),
                ("a", "small", "blue", "triangle")]
    for relation, templates in synthetic.TEMPLATES.items():
        count = 1 if relation in ("left", "middle", "right") else 2 if relation in (
            "left_of", "above") else 3
        words = [" ".join(w for w in m if w) for m in mentions[:count]]
        for template in templates:
            parsed = synthetic.parse_caption(template.format(*words))
            assert parsed == synthetic.ParsedCaption(relation, tuple(
                synthetic.Mention(c, s, size) for _, size, c, s in mentions[:count])), template


_SCENES = {
    "1": {"relation": "left", "objects": [
        {"colour": "red", "shape": "circle", "size": "large", "x": 0.2, "y": 0.5}]},
    "2": {"relation": "left_of", "objects": [
        {"colour": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.5},
        {"colour": "blue", "shape": "square", "size": "large", "x": 0.7, "y": 0.5}]},
    "3": {"relation": "above", "objects": [
        {"colour": "red", "shape": "circle", "size": "small", "x": 0.5, "y": 0.2},
        {"colour": "blue", "shape": "square", "size": "small", "x": 0.5, "y": 0.7}]},
    "4": {"relation": "row", "objects": [
        {"colour": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.5},
        {"colour": "blue", "shape": "square", "size": "small", "x": 0.5, "y": 0.5},
        {"colour": "green", "shape": "triangle", "size": "small", "x": 0.8, "y": 0.5}]},
}


@pytest.mark.parametrize("image_id, caption, correct", [
    ("1", "A large red circle on the left.", True),
    ("1", "there is a red circle on the left side", True),
    ("1", "a small red circle on the left", True),  # sizes are not judged
    ("1", "a red circle on the right", False),
    ("1", "on the left of the image, there is a red circle", True),
    ("1", "in the center is a red circle", False),
    ("1", "a red circle in the middle of the image", False),
    ("1", "a red square on the left", False),
    ("1", "a red circle", False),
    ("2", "a small red circle to the left of a blue square", True),
    ("2", "a blue square to the right of a red circle", True),
    ("2", "a red circle left of a large blue square", True),
    ("2", "there is a red circle on the left of a blue square", True),
    ("2", "a blue square is right of a red circle", True),
    ("2", "a blue square to the left of a red circle", False),
    ("2", "a red circle above a blue square", False),
    ("2", "a red circle to the left of a blue square and a green triangle", False),
    ("3", "a blue square is below a red circle", True),
    ("3", "a red circle on top of a blue square", True),
    ("3", "a blue square under a red circle", True),
    ("3", "a red circle over a blue square", True),
    ("3", "there is a blue square beneath a red circle", True),
    ("3", "a red circle beneath a blue square", False),
    ("3", "a blue circle on top of a red square", False),
    ("4", "from left to right a red circle a blue square and a green triangle", True),
    ("4", "From left to right: a red circle, a blue square and a green triangle.", True),
    ("4", "a green triangle a blue square and a red circle from right to left", True),
    ("4", "from left to right a blue square a red circle and a green triangle", False),
    ("4", "from left to right a red circle and a blue square", False),
    ("4", "", False),
])
def test_handwritten_captions(image_id, caption, correct):
    assert synthetic.caption_matches_scene(caption, _SCENES[image_id]) is correct


def test_scene_accuracy():
    predictions = {1: "a red circle on the left", "2": "a red circle above a blue square",
                   "3": "a red circle above a blue square", "4": "[UNK] [UNK]"}
    assert synthetic.scene_accuracy(predictions, _SCENES) == 0.5
    with pytest.raises(UserError, match="image id 9 has no synthetic scene"):
        synthetic.scene_accuracy({9: "a red circle on the left"}, _SCENES)


def test_existing_dataset_is_kept_replaced_only_when_incomplete(tmp_path):
    out_dir = str(tmp_path / "data")
    assert not synthetic.is_complete(out_dir)
    synthetic.generate(out_dir, 5, seed=1, image_size=48)
    assert synthetic.is_complete(out_dir)
    before = tree_bytes(out_dir)
    synthetic.generate(out_dir, 5, seed=1, image_size=48)
    assert tree_bytes(out_dir) == before
    with pytest.raises(UserError, match="pick another --out_dir or delete it"):
        synthetic.generate(out_dir, 6, seed=1, image_size=48)

    os.remove(os.path.join(out_dir, "DONE"))  # as if killed just before the end
    assert not synthetic.is_complete(out_dir)
    with pytest.raises(UserError, match="no complete synthetic dataset"):
        synthetic.load_scenes(out_dir)
    synthetic.generate(out_dir, 5, seed=1, image_size=48)
    assert tree_bytes(out_dir) == before


def _cli(*args: str, module: str = "dist_caption.make_synthetic") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.setting("out_dir", "num_images", "synthetic:seed", "image_size")
@pytest.mark.slow
def test_cli_writes_a_dataset(tmp_path):
    out_dir = tmp_path / "cli"
    result = _cli(f"--out_dir={out_dir}", "--num_images=10", "--seed=2", "--image_size=64")
    assert result.returncode == 0, result.stderr
    assert synthetic.is_complete(str(out_dir))
    assert len(os.listdir(out_dir / "images")) == 10
    with Image.open(out_dir / "images" / "000000001.jpg") as image:
        assert image.size == (64, 64)
    synthetic.generate(str(tmp_path / "seed2"), 10, seed=2, image_size=64)
    assert tree_bytes(str(out_dir)) == tree_bytes(str(tmp_path / "seed2"))  # seed 2's scenes


@pytest.mark.slow
def test_cli_bad_flag_is_one_line_exit_2(tmp_path):
    # (by the command's older name, which runs the same command)
    result = _cli(f"--out_dir={tmp_path}", "--num_images=-3", module="dist_caption.data.synthetic")
    # One `error:` line (TensorFlow, now imported by the file layer, may print its start-up
    # notices before it: see dist_caption/console.py).
    assert_one_line_error(result, "--num_images")
    assert not os.listdir(tmp_path)


def test_a_dataset_made_with_other_settings_is_refused_for_extraction(tmp_path, caplog):
    """The default grew from 3,000 to 10,000 scenes: an older data/synthetic must not silently
    become the 10,000-scene cache; reading images from it (report) still works."""
    from dist_caption.data import sources
    from dist_caption.data.records import LoadReport

    out_dir = str(tmp_path / "syn")
    assert len(sources.synthetic_records(out_dir, 10, 2, 48, LoadReport())) == 10
    before = tree_bytes(out_dir)
    with pytest.raises(UserError, match="made with .*'num_images': 10.*delete it"):
        sources.synthetic_records(out_dir, 12, 2, 48, LoadReport())
    assert tree_bytes(out_dir) == before
    assert len(sources.synthetic_records(out_dir, 12, 2, 48, LoadReport(), strict=False)) == 10
    assert "using it as it is" in caplog.text
