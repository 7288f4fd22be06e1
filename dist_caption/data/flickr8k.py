"""Flickr8k captions in either published layout, with the official split or a stable hash split.

The two layouts, told apart by their content:

    captions.txt         image,caption              (CSV with a header; Kaggle's copy)
    Flickr8k.token.txt   name.jpg#0<TAB>caption     (the original release)
"""

from __future__ import annotations

import csv
import logging
import os

from dist_caption.data.coco import read_text, sort_records
from dist_caption.data.records import CaptionRecord, LoadReport, finalize, hash_split
from dist_caption.errors import UserError

_HINT = "is this Flickr8k's captions.txt or Flickr8k.token.txt?"
_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                "test": "Flickr_8k.testImages.txt"}
# Hash split: of 8 equal buckets, 6 are train, 1 val, 1 test (75% / 12.5% / 12.5%).
_HASH_BUCKETS = ("train",) * 6 + ("val", "test")


def load_flickr8k(captions_file: str, image_dir: str, splits_dir: str | None = None,
                  report: LoadReport | None = None) -> list[CaptionRecord]:
    """Loads Flickr8k; the image id is the file name and the image is `image_dir/name`.

    The split comes from Flickr_8k.{train,dev,test}Images.txt (dev -> val) in `splits_dir`,
    by default the captions file's folder; images in none of them are skipped and logged.
    Without those files every image is put in a split by a hash of its name (75% train, 12.5%
    val, 12.5% test), which stays the same across runs, machines and dataset versions.
    """
    report = LoadReport() if report is None else report
    captions = _read_captions(captions_file)
    folder = os.path.dirname(captions_file) if splits_dir is None else splits_dir
    splits = _read_splits(folder, required=splits_dir is not None)
    if splits is None:
        logging.info("no Flickr_8k.*Images.txt in %s: images split by a hash of their name",
                     folder or ".")
    records, unlisted = [], []
    for name, texts in captions.items():
        split = hash_split(name, _HASH_BUCKETS) if splits is None else splits.get(name)
        if split is None:
            unlisted.append(name)
            continue
        records.append(CaptionRecord(name, os.path.join(image_dir, name), tuple(texts), split))
    if unlisted:
        logging.warning("%d images of %s are in no split file (e.g. %s); skipped", len(unlisted),
                        captions_file, unlisted[0])
        report.unlisted_images.extend(unlisted)
    return finalize(sort_records(records), report)


def _read_captions(path: str) -> dict[str, list[str]]:
    """Image name -> captions, in file order, from either layout."""
    name = os.path.basename(path)
    lines = _lines(path)
    if not lines:
        raise UserError(f"{name}: no captions in the file; {_HINT}")
    number, first = lines[0]
    if first.replace(" ", "").lower() == "image,caption":
        parse, lines = _csv_line, lines[1:]
    elif "\t" in first:
        parse = _token_line
    else:
        raise UserError(f"{name} line {number}: expected the header 'image,caption' or "
                        f"'name.jpg#0<TAB>caption'; {_HINT}")
    captions: dict[str, list[str]] = {}
    for number, line in lines:
        image, caption = parse(line, f"{name} line {number}")
        captions.setdefault(image, []).append(caption)
    return captions


def _csv_line(line: str, where: str) -> tuple[str, str]:
    """(image, caption) of a captions.txt row; an unquoted caption's commas split it, so the
    fields after the first are joined again."""
    row = next(csv.reader([line]))
    if len(row) < 2 or not row[0].strip():
        raise UserError(f"{where}: expected 'image,caption', got {line[:60]!r}; {_HINT}")
    return row[0].strip(), ",".join(row[1:]).strip()


def _token_line(line: str, where: str) -> tuple[str, str]:
    """(image, caption) of a Flickr8k.token.txt line 'name.jpg#n<TAB>caption'."""
    key, tab, caption = line.partition("\t")
    image, hash_sign, number = key.strip().rpartition("#")
    if not tab or not hash_sign or not image or not number.isdecimal():
        raise UserError(f"{where}: expected 'name.jpg#0<TAB>caption', got {line[:60]!r}; "
                        f"{_HINT}")
    return image, caption.strip()


def _read_splits(folder: str, required: bool) -> dict[str, str] | None:
    """Image name -> split from the three split files in `folder`.

    None when none of them is there and they are not `required`; once one is there, all are.
    """
    paths = {split: os.path.join(folder, file) for split, file in _SPLIT_FILES.items()}
    if not required and not any(os.path.isfile(p) for p in paths.values()):
        return None
    splits: dict[str, str] = {}
    for split, path in paths.items():
        for number, line in _lines(path):
            image = line.strip()
            if splits.setdefault(image, split) != split:
                raise UserError(f"{os.path.basename(path)} line {number}: {image} is also in "
                                f"{_SPLIT_FILES[splits[image]]}; an image belongs to one split")
    return splits


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, line) of the file's non-blank lines."""
    return [(number, line) for number, line in enumerate(read_text(path).split("\n"), 1)
            if line.strip()]
