"""The embedded default dataset: scenes of coloured shapes whose captions need the image.

    python -m dist_caption.make_synthetic --out_dir data/synthetic --num_images 10000 --seed 0

Each JPEG holds 1-3 objects (a colour, a shape, a size) on a grey background. A caption names
every object's colour and shape and where it is, so a captioner must look at the image, at
positions too, to get it right; `caption_matches_scene` scores that exactly.

Layouts, chosen so every relation is unambiguous:
  1 object   its horizontal third: relation "left", "middle" or "right";
  2 objects  apart along one dominant axis: relation "left_of" or "above" (objects[0] is left
             of / above objects[1]);
  3 objects  a horizontal row: relation "row", objects listed left to right.

Captions come from one fixed grammar, `TEMPLATES`, shared by the generator and the parser.
An object is "a|an [small|large] COLOUR SHAPE"; sentences, with O an object:
  1: O on the left | there is O on the left side | O is in the middle | on the right, there is O
     | in the center is O | ... (position: on the left/right [side | of the image],
     in the middle [of the image], in the center)
  2: O REL O | O is REL O | there is O REL O, with REL one of: to the left of, left of,
     on the left of, (the same with right), above, on top of, over, below, under, beneath
  3: from left to right O, O and O | O, O and O from right to left | ...

Files written (COCO captions format, splits 80/10/10 by id):
  OUT/images/000000001.jpg, OUT/annotations/captions_{train,val,test}.json,
  OUT/scenes.json (image id -> {"relation", "objects": [{shape, colour, size, x, y}]}, x and y
  the centre as a fraction of the side, y downwards), and OUT/DONE, written last.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from typing import Any, Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from dist_caption.data.records import SPLITS
from dist_caption.data.text import standardize_py
from dist_caption.errors import UserError
from dist_caption.files import write_atomic, write_json_atomic

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Side of an object's bounding box, as a fraction of the image side.
SIZES = {"small": 0.15, "large": 0.25}
CAPTIONS_PER_IMAGE = 5

Scene = Mapping[str, Any]

_MARGIN = 0.03  # free border around every object, fraction of the side
_JPEG_QUALITY = 92
_SUPERSAMPLE = 2  # shapes are drawn at twice the size, then reduced, for smooth edges

_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "on the left of the image"),
    "middle": ("in the middle", "in the center", "in the middle of the image"),
    "right": ("on the right", "on the right side", "on the right of the image"),
}
_SINGLE_FRAMES = ("{0} {p}", "there is {0} {p}", "{0} is {p}", "{p}, there is {0}", "{p} is {0}")
# relation -> (phrases for "objects[0] _ objects[1]", phrases for "objects[1] _ objects[0]")
_PAIR_PHRASES = {
    "left_of": (("to the left of", "left of", "on the left of"),
                ("to the right of", "right of", "on the right of")),
    "above": (("above", "on top of", "over"), ("below", "under", "beneath")),
}
_PAIR_FRAMES = ("{a} {r} {b}", "{a} is {r} {b}", "there is {a} {r} {b}")
_ROW_TEMPLATES = (
    "from left to right {0}, {1} and {2}",
    "from left to right there are {0}, {1} and {2}",
    "{0}, {1} and {2} from left to right",
    "{0}, {1} and {2} in a row from left to right",
    "from right to left {2}, {1} and {0}",
    "{2}, {1} and {0} from right to left",
)


def _build_templates() -> dict[str, tuple[str, ...]]:
    templates = {rel: tuple(frame.replace("{p}", phrase)
                            for frame in _SINGLE_FRAMES for phrase in phrases)
                 for rel, phrases in _POSITION_PHRASES.items()}
    for rel, (forward, backward) in _PAIR_PHRASES.items():
        templates[rel] = tuple(
            frame.replace("{a}", a).replace("{r}", phrase).replace("{b}", b)
            for frame in _PAIR_FRAMES
            for a, b, phrases in (("{0}", "{1}", forward), ("{1}", "{0}", backward))
            for phrase in phrases)
    templates["row"] = _ROW_TEMPLATES
    return templates


# relation -> caption templates; "{k}" stands for objects[k] of the scene.
TEMPLATES = _build_templates()
_PLACEHOLDER = re.compile(r"\{(\d)\}")


def _pattern_key(template: str) -> str:
    """The template as standardised words with every object slot reduced to "{}"."""
    return " ".join(_PLACEHOLDER.sub(" {} ", template).replace(",", " ").split())


# word pattern -> (relation, the scene index of each object slot in reading order)
_PATTERNS = {_pattern_key(t): (rel, tuple(int(k) for k in _PLACEHOLDER.findall(t)))
             for rel, templates in TEMPLATES.items() for t in templates}


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------

class Mention(NamedTuple):
    """One object as a caption names it; `size` is None when the caption does not say."""

    colour: str
    shape: str
    size: str | None


class ParsedCaption(NamedTuple):
    """A caption in scene terms: `objects` in the scene's canonical order (see module doc)."""

    relation: str
    objects: tuple[Mention, ...]


def parse_caption(caption: str) -> ParsedCaption | None:
    """Reads a raw or standardised caption back into scene terms; None if off the grammar."""
    words = standardize_py(caption).split()
    pattern, mentions = [], []
    i = 0
    while i < len(words):
        j = i + (words[i] in ("a", "an"))
        size = words[j] if j < len(words) and words[j] in SIZES else None
        j += size is not None
        if j + 1 < len(words) and words[j] in COLOURS and words[j + 1] in SHAPES:
            mentions.append(Mention(words[j], words[j + 1], size))
            pattern.append("{}")
            i = j + 2
        else:
            pattern.append(words[i])
            i += 1
    meaning = _PATTERNS.get(" ".join(pattern))
    if meaning is None:
        return None
    relation, slots = meaning
    objects = [None] * len(slots)
    for slot, mention in zip(slots, mentions):
        objects[slot] = mention
    return ParsedCaption(relation, tuple(objects))


def caption_matches_scene(caption: str, scene: Scene) -> bool:
    """True iff the caption names exactly the scene's objects (colour, shape) and relation.

    Sizes are not judged: the task is about what and where, and size words are optional.
    """
    parsed = parse_caption(caption)
    if parsed is None or parsed.relation != scene["relation"]:
        return False
    return ([(m.colour, m.shape) for m in parsed.objects]
            == [(o["colour"], o["shape"]) for o in scene["objects"]])


def scene_accuracy(predictions: Mapping[Any, str], scenes: Mapping[str, Scene]) -> float:
    """Fraction of predicted captions that match their image's scene (ids compared as str)."""
    if not predictions:
        raise UserError("no predictions to score against the synthetic scenes")
    correct = 0
    for image_id, caption in predictions.items():
        scene = scenes.get(str(image_id))
        if scene is None:
            raise UserError(f"image id {image_id} has no synthetic scene: were the predictions "
                            "made on another dataset?")
        correct += caption_matches_scene(caption, scene)
    return correct / len(predictions)


def is_complete(out_dir: str) -> bool:
    """True iff `out_dir` holds a fully written dataset (its DONE marker exists)."""
    return os.path.isfile(os.path.join(out_dir, "DONE"))


def settings(out_dir: str) -> dict:
    """The settings a complete dataset was made with: num_images, seed, image_size."""
    with open(os.path.join(out_dir, "DONE"), encoding="utf-8") as f:
        return json.load(f)


def load_scenes(out_dir: str) -> dict[str, dict]:
    """The scenes of a complete dataset, keyed by image id as a string."""
    if not is_complete(out_dir):
        raise UserError(f"{out_dir} holds no complete synthetic dataset; make one with "
                        f"python -m dist_caption.make_synthetic --out_dir {out_dir}")
    with open(os.path.join(out_dir, "scenes.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

def _spread(rng: np.random.Generator, start: float, extents: list[float], gap: float,
            end: float) -> list[float]:
    """Centres of boxes laid along [start, end] in order, at least `gap` apart, slack random."""
    slack = end - start - sum(extents) - gap * (len(extents) - 1)
    extra = rng.dirichlet(np.ones(len(extents) + 1)) * slack
    centres, edge = [], start
    for extent, free in zip(extents, extra):
        edge += free
        centres.append(edge + extent / 2)
        edge += extent + gap
    return centres


def _sample_scene(rng: np.random.Generator) -> dict:
    num_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=num_objects, replace=False)
    colours = list(COLOURS)
    objects = [{"shape": SHAPES[k % len(SHAPES)], "colour": colours[k // len(SHAPES)],
                "size": "large" if rng.random() < 0.5 else "small"} for k in kinds]
    extents = [SIZES[o["size"]] for o in objects]
    low, high = _MARGIN, 1 - _MARGIN

    if num_objects == 1:
        relation = str(rng.choice(list(_POSITION_PHRASES)))
        half = extents[0] / 2
        x_range = {"left": (low + half, 0.30), "middle": (0.42, 0.58),
                   "right": (0.70, high - half)}[relation]
        xs, ys = [rng.uniform(*x_range)], [rng.uniform(0.25, 0.75)]
    elif num_objects == 2:
        relation = str(rng.choice(list(_PAIR_PHRASES)))
        # Along the main axis the centres are >= 0.3 apart; across it, less than half that.
        gap = max(0.08, 0.3 - sum(extents) / 2)
        main = _spread(rng, low, extents, gap, high)
        first = rng.uniform(low + extents[0] / 2, high - extents[0] / 2)
        second = first + rng.uniform(-0.3, 0.3) * (main[1] - main[0])
        cross = [first, float(np.clip(second, low + extents[1] / 2, high - extents[1] / 2))]
        xs, ys = (main, cross) if relation == "left_of" else (cross, main)
    else:
        relation = "row"
        xs = _spread(rng, low, extents, 0.05, high)
        base = rng.uniform(0.3, 0.7)
        ys = [base + rng.uniform(-0.05, 0.05) for _ in objects]

    for o, x, y in zip(objects, xs, ys):
        o["x"], o["y"] = round(float(x), 4), round(float(y), 4)
    return {"relation": relation, "objects": objects}


def _captions(rng: np.random.Generator, scene: Scene) -> list[str]:
    """CAPTIONS_PER_IMAGE captions from distinct templates; each size word is said or not."""
    templates = TEMPLATES[scene["relation"]]
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for t in chosen:
        mentions = []
        for o in scene["objects"]:
            words = ([o["size"]] if rng.random() < 0.5 else []) + [o["colour"], o["shape"]]
            mentions.append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
        captions.append(templates[t].format(*mentions))
    return captions


def _render(rng: np.random.Generator, scene: Scene, image_size: int) -> bytes:
    """JPEG bytes: a grey background with a mild gradient and noise, then the objects."""
    side = image_size * _SUPERSAMPLE
    grey = rng.uniform(70, 180)
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0, 20)
    ramp = np.linspace(-1, 1, side)
    gradient = amplitude * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    background = grey + gradient  # within [50, 200]: no clipping needed
    image = Image.fromarray(background.astype(np.uint8)).convert("RGB")

    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        jitter = rng.integers(-12, 13, size=3)
        colour = tuple(min(255, max(0, c + int(j))) for c, j in zip(COLOURS[o["colour"]], jitter))
        cx, cy, r = o["x"] * side, o["y"] * side, SIZES[o["size"]] * side / 2
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif o["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)

    image = image.resize((image_size, image_size), Image.Resampling.BOX)
    noise = rng.normal(0, 4, size=(image_size, image_size, 1))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------



def generate(out_dir: str, num_images: int, seed: int, image_size: int = 128) -> None:
    """Writes the dataset (see module doc) to `out_dir`; the same seed gives the same bytes.

    A complete dataset with the same parameters is kept as is; one with other parameters is a
    `UserError`, so a cache built from it is never silently mixed with new data.
    """
    params = {"num_images": num_images, "seed": seed, "image_size": image_size}
    if is_complete(out_dir):
        existing = settings(out_dir)
        if existing != params:
            raise UserError(f"{out_dir} already holds a synthetic dataset made with {existing}, "
                            f"not {params}: pick another --out_dir or delete it")
        logging.info("%s already holds this synthetic dataset; nothing to do", out_dir)
        return

    start = time.time()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    scenes, images, annotations = {}, [], []
    for index in range(num_images):
        rng = np.random.default_rng((seed, index))
        image_id = index + 1
        file_name = f"{image_id:09d}.jpg"
        scene = _sample_scene(rng)
        write_atomic(os.path.join(out_dir, "images", file_name), _render(rng, scene, image_size))
        scenes[str(image_id)] = scene
        images.append({"id": image_id, "file_name": file_name,
                       "width": image_size, "height": image_size})
        for caption in _captions(rng, scene):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "caption": caption})
    write_json_atomic(os.path.join(out_dir, "scenes.json"), scenes)

    # Splits by id: the first 80% train, the next 10% val, the rest test.
    bounds = [0, num_images * 8 // 10, num_images * 9 // 10, num_images]
    for split, lo, hi in zip(SPLITS, bounds, bounds[1:]):
        write_json_atomic(os.path.join(out_dir, "annotations", f"captions_{split}.json"), {
            "info": {"description": "dist_caption synthetic shapes", "split": split, **params},
            "images": images[lo:hi],
            "annotations": [a for a in annotations if lo < a["image_id"] <= hi],
        })
    write_json_atomic(os.path.join(out_dir, "DONE"), params)
    logging.info("wrote %d synthetic scenes to %s in %.1f s (train/val/test %d/%d/%d)",
                 num_images, out_dir, time.time() - start, bounds[1], bounds[2] - bounds[1],
                 bounds[3] - bounds[2])


def wait_for_complete(folder: str, timeout: float) -> None:
    """Tasks other than 0 wait for task 0 to generate the synthetic dataset (generating it in
    every task would only repeat the same work)."""
    deadline = time.monotonic() + timeout
    while not is_complete(folder):
        if time.monotonic() > deadline:
            raise UserError(f"no complete synthetic dataset in {folder} after {timeout:g} s: "
                            "did extraction task 0 fail? see its log")
        time.sleep(0.5)


if __name__ == "__main__":
    # The command's older name: run `python -m dist_caption.make_synthetic` by name, so that
    # this library module never imports a command.
    import runpy

    runpy.run_module("dist_caption.make_synthetic", run_name="__main__", alter_sys=True)
