"""Captioning local images with an export (`LoadedExport`), and drawing where each word looked
(`draw_attention`): the decoder's cross-attention over the feature grid (mean over heads, last
layer) laid over the picture, as the TensorFlow tutorials do. The command is
`python -m dist_caption.predict` (predict.py); `reporting.py` uses the same loader.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from dist_caption.errors import UserError
from serving import contract
from serving.client import name_the_image, read_file
from serving.local_server.loading import version_folders
from serving.local_server.signatures import clean_tf_message

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
MAX_ATTENTION_ROWS = 8
PANEL, TITLE = 160, 16  # pixels: a word's square panel, and its title's strip


def resolve_saved_model(path: str) -> str:
    """A version folder itself, or the newest version folder inside a base folder."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = version_folders(path)
    if not versions:
        raise UserError(f"no SavedModel in {path}: pass an export version folder or its base "
                        "folder (python -m dist_caption.export writes them)")
    return os.path.join(path, str(versions[-1]))


def find_images(paths: list[str]) -> list[str]:
    """Image files named directly or found (sorted) under the given folders."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                            for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(paths)}")
    return found


class LoadedExport:
    """An export loaded in Python: captions image files batch by batch, naming the file of a
    bad image.

    >>> captioner = LoadedExport("exports/caption")        # doctest: +SKIP
    >>> captioner.caption(["cat.jpg"])[0]["caption"]       # doctest: +SKIP
    'a cat on a sofa'
    """

    def __init__(self, saved_model: str):
        self.path = resolve_saved_model(saved_model)
        self.loaded = tf.saved_model.load(self.path)
        with open(os.path.join(self.path, "assets.extra", "dist_caption.json"),
                  encoding="utf-8") as f:
            self.metadata = json.load(f)

    def caption(self, paths: list[str], beam: int = 0) -> list[dict]:
        """One dict per image: caption, tokens, log_prob (and attention, or beams)."""
        if beam > self.metadata["max_beam"]:
            raise UserError(f"--beam {beam} is above the export's limit of "
                            f"{self.metadata['max_beam']}: pass a smaller --beam, or export "
                            "with a larger --max_beam")
        results = []
        step = self.metadata["max_batch"]
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            images = tf.constant([read_file(p) for p in chunk])
            try:
                if beam:
                    out = getattr(self.loaded, contract.BEAM_SEARCH)(**{
                        contract.IMAGE_BYTES: images,
                        contract.BEAM_WIDTH: tf.fill([len(chunk)], beam)})
                else:
                    out = getattr(self.loaded, contract.DEFAULT)(
                        **{contract.IMAGE_BYTES: images})
            except tf.errors.InvalidArgumentError as e:
                raise UserError(name_the_image(clean_tf_message(e.message), chunk)) from None
            out = {k: v.numpy() for k, v in out.items()}
            for i, path in enumerate(chunk):
                item = {"path": path}
                if beam:
                    item["beams"] = [
                        {"caption": c.decode(), "log_prob": float(lp),
                         "tokens": t[:n].tolist()}
                        for c, lp, t, n in zip(out["caption"][i], out["log_prob"][i],
                                               out["tokens"][i], out["length"][i])]
                    item.update(item["beams"][0])
                else:
                    n = int(out["length"][i])
                    item.update(caption=out["caption"][i].decode(),
                                log_prob=float(out["log_prob"][i]),
                                tokens=out["tokens"][i][:n].tolist(),
                                attention=out["attention"][i][:n])
                results.append(item)
        return results


def draw_attention(results: list[dict], grid: tuple[int, int], vocab_words: list[str],
                   out: str) -> None:
    """One row per image (at most 8), one panel per emitted word: the word, and the picture
    overlaid with its attention map (bilinearly upsampled, scaled from its lowest weight,
    black, to its highest, white, at 60% opacity)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageOps

    rows = results[:MAX_ATTENTION_ROWS]
    cols = max(len(r["tokens"]) for r in rows)
    sheet = Image.new("RGB", (PANEL * cols, PANEL * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    area = (PANEL - 4, PANEL - TITLE - 4)  # a 2-pixel margin around the picture
    for y, result in enumerate(rows):
        with Image.open(result["path"]) as image:
            picture = ImageOps.contain(image.convert("RGB"), area)
        for x, (token, weights) in enumerate(zip(result["tokens"], result["attention"])):
            attention = np.asarray(weights, np.float32).reshape(grid)
            low, high = attention.min(), attention.max()
            scaled = (attention - low) / (high - low) if high > low else attention * 0
            heat = Image.fromarray(np.uint8(np.round(255 * scaled))).resize(
                picture.size, Image.BILINEAR).convert("RGB")
            left, top = x * PANEL, y * PANEL
            word = vocab_words[token]
            draw.text((left + (PANEL - draw.textlength(word)) / 2, top + 2), word, fill="black")
            sheet.paste(Image.blend(picture, heat, 0.6),
                        (left + (PANEL - picture.width) // 2, top + TITLE + 2))
    sheet.save(out)
