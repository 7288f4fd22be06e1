"""COCO captions: the official JSON files (2014 and 2017) and Karpathy's split files.

Both loaders turn every problem in a file into a `UserError` that names the file and the record
(records are numbered from 0, as in the JSON list), and end with `records.finalize`, so dropped
captions, images and files are counted in the `LoadReport`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterator, Sequence

from dist_caption.data.records import SPLITS, CaptionRecord, LoadReport, finalize
from dist_caption.errors import UserError

_COCO_HINT = "is this a COCO captions file?"
_KARPATHY_HINT = "is this a Karpathy split file (dataset_coco.json)?"
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
# The image folder of a COCO release, as named in its captions file: captions_val2017.json.
_COCO_FOLDER = re.compile(r"(train|val|test)\d{4}")
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "a boolean", type(None): "null"}


def read_text(path: str) -> str:
    """The UTF-8 text of a file, BOM removed and line endings made '\\n'.

    A missing, unreadable or non-UTF-8 file is a `UserError` naming it.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise open_error(path, e) from None


def open_error(path: str, error: OSError) -> UserError:
    """The one-line error for a file that cannot be opened or read."""
    if isinstance(error, FileNotFoundError):
        return UserError(f"{path}: no such file; check the path")
    return UserError(f"{path}: cannot read it ({error.strerror}); check the path")


def read_json(path: str, keys: Sequence[str], hint: str) -> dict[str, list]:
    """Parses a JSON file whose top level is an object holding the list `keys`.

    `hint` ends every error message, e.g. "is this a COCO captions file?".
    """
    name = os.path.basename(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{name}: not valid JSON at line {e.lineno} column {e.colno} "
                        f"({e.msg}); {hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"{name}: the top level is {_json_type(data)}, not an object; {hint}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise UserError(f"{name}: no top-level {key!r} list; {hint}")
    return data


def sort_records(records: Sequence[CaptionRecord]) -> list[CaptionRecord]:
    """Records in split order (train, val, test), then by image id, numerically when numeric."""
    return sorted(records, key=lambda r: (SPLITS.index(r.split), _id_key(r.image_id)))


def load_coco(captions_json: Sequence[str], image_dir: str,
              report: LoadReport | None = None) -> list[CaptionRecord]:
    """Loads COCO captions files, e.g. captions_train2017.json and captions_val2017.json.

    The split of a file comes from its name ('train', 'val' or 'test' in the basename); write
    "test=/x/captions.json" to set it explicitly. If no file is a test split, the val images
    are divided into val and test: sorted by image id, alternately val, test, val, ... so the
    result is deterministic. (For the standard published split use `load_karpathy`.)

    An image is `image_dir/file_name` if that exists, else `image_dir/<folder>/file_name` with
    the folder named after the file (captions_val2014.json -> val2014), so both the flat and the
    official layout work. Images found in neither place are reported missing by `finalize`.
    """
    report = LoadReport() if report is None else report
    if isinstance(captions_json, str):
        captions_json = [captions_json]
    if not captions_json:
        raise UserError("no COCO captions file given; pass e.g. captions_train2017.json")
    images = Images()
    splits = set()
    for spec in captions_json:
        split, path = _split_of(spec)
        splits.add(split)
        _read_coco_file(path, split, image_dir, images)
    records = images.records(report)
    if "test" not in splits:
        records = _halve_val(records)
    return finalize(sort_records(records), report)


def load_karpathy(karpathy_json: str, image_dir: str,
                  report: LoadReport | None = None) -> list[CaptionRecord]:
    """Loads a Karpathy split file (dataset_coco.json, dataset_flickr8k.json, ...).

    The image id is `cocoid` (`imgid` when there is none); 'restval' images count as train;
    captions are the `raw` sentences (the joined `tokens` when a sentence has no `raw`). An
    image is `image_dir/filepath/filename`, or `image_dir/filename` when there is no filepath.
    """
    report = LoadReport() if report is None else report
    name = os.path.basename(karpathy_json)
    data = read_json(karpathy_json, ("images",), _KARPATHY_HINT)
    images = Images()
    for where, image in _objects(data, "images", name, "image", _KARPATHY_HINT):
        if "cocoid" not in image and "imgid" not in image:
            raise UserError(f"{where} has neither a 'cocoid' nor an 'imgid' field; "
                            f"{_KARPATHY_HINT}")
        key = "cocoid" if "cocoid" in image else "imgid"
        image_id = str(_field(image, key, (int, str), where, _KARPATHY_HINT))
        where = f"{where} (id {image_id})"
        filename = _field(image, "filename", str, where, _KARPATHY_HINT)
        split = _field(image, "split", str, where, _KARPATHY_HINT)
        if split not in _KARPATHY_SPLITS:
            raise UserError(f"{where} has split {split!r}, expected one of "
                            f"{', '.join(_KARPATHY_SPLITS)}; {_KARPATHY_HINT}")
        filepath = ""
        if "filepath" in image:
            filepath = _field(image, "filepath", str, where, _KARPATHY_HINT)
        captions = images.add(image_id, os.path.join(image_dir, filepath, filename),
                              _KARPATHY_SPLITS[split])
        for sentence_where, sentence in _objects(image, "sentences", where, "sentence",
                                                 _KARPATHY_HINT):
            captions.append(_sentence(sentence, sentence_where))
    return finalize(sort_records(images.records(report)), report)


class Images:
    """Images by id; a repeated id keeps its first path and split and merges the captions."""

    def __init__(self):
        self._entries: dict[str, tuple[str, str, list[str]]] = {}
        self._duplicates: list[str] = []
        self.orphan_captions = 0

    def add(self, image_id: str, path: str, split: str) -> list[str]:
        """Registers an image and returns its caption list, to append to."""
        if image_id in self._entries:
            if image_id not in self._duplicates:
                self._duplicates.append(image_id)
        else:
            self._entries[image_id] = (path, split, [])
        return self._entries[image_id][2]

    def records(self, report: LoadReport) -> list[CaptionRecord]:
        """The merged records; duplicate ids go to the report with one warning for them all."""
        if self._duplicates:
            logging.warning("%d image ids appear more than once (e.g. %s); their captions were "
                            "merged", len(self._duplicates), self._duplicates[0])
            report.duplicate_ids.extend(self._duplicates)
        report.orphan_captions += self.orphan_captions
        return [CaptionRecord(image_id, path, tuple(captions), split)
                for image_id, (path, split, captions) in self._entries.items()]


def _read_coco_file(path: str, split: str, image_dir: str, images: Images) -> None:
    """Adds the images of one COCO captions file and the captions that refer to them."""
    name = os.path.basename(path)
    data = read_json(path, ("images", "annotations"), _COCO_HINT)
    match = _COCO_FOLDER.search(name)
    folder = match.group(0) if match else None
    captions_of = {}
    for where, image in _objects(data, "images", name, "image", _COCO_HINT):
        image_id = str(_field(image, "id", (int, str), where, _COCO_HINT))
        file_name = _field(image, "file_name", str, f"{where} (id {image_id})", _COCO_HINT)
        captions_of[image_id] = images.add(
            image_id, _image_path(image_dir, folder, file_name), split)
    for where, annotation in _objects(data, "annotations", name, "annotation", _COCO_HINT):
        if "id" in annotation:
            where = f"{where} (id {annotation['id']})"
        image_id = str(_field(annotation, "image_id", (int, str), where, _COCO_HINT))
        caption = _field(annotation, "caption", str, where, _COCO_HINT)
        if image_id not in captions_of:
            logging.warning("%s refers to image %s, which %s does not list; skipped", where,
                            image_id, name)
            images.orphan_captions += 1
            continue
        captions_of[image_id].append(caption)


def _split_of(spec: str) -> tuple[str, str]:
    """(split, path) of "split=path", or of a path whose basename names exactly one split."""
    prefix, sep, path = spec.partition("=")
    if sep and prefix in SPLITS:
        return prefix, path
    name = os.path.basename(spec).lower()
    found = [split for split in SPLITS if split in name]
    if len(found) != 1:
        raise UserError(f"{spec}: cannot tell the split from the file name; "
                        f"write it as 'train={spec}' (or val=, test=)")
    return found[0], spec


def _image_path(image_dir: str, folder: str | None, file_name: str) -> str:
    """image_dir/file_name if it exists, else image_dir/folder/file_name if that exists."""
    flat = os.path.join(image_dir, file_name)
    if folder and not os.path.isfile(flat):
        nested = os.path.join(image_dir, folder, file_name)
        if os.path.isfile(nested):
            return nested
    return flat


def _halve_val(records: list[CaptionRecord]) -> list[CaptionRecord]:
    """Every second val image (by sorted id) becomes test."""
    val_ids = sorted((r.image_id for r in records if r.split == "val"), key=_id_key)
    test_ids = set(val_ids[1::2])
    logging.info("no test split given: %d val images divided into %d val and %d test",
                 len(val_ids), len(val_ids) - len(test_ids), len(test_ids))
    return [dataclasses.replace(r, split="test") if r.image_id in test_ids else r
            for r in records]


def _sentence(sentence: dict[str, Any], where: str) -> str:
    """The caption of a Karpathy sentence: `raw`, else the `tokens` joined by spaces."""
    if "raw" in sentence:
        return _field(sentence, "raw", str, where, _KARPATHY_HINT)
    tokens = _field(sentence, "tokens", list, where, _KARPATHY_HINT)
    if not all(isinstance(token, str) for token in tokens):
        raise UserError(f"{where}: 'tokens' must be a list of strings; {_KARPATHY_HINT}")
    return " ".join(tokens)


def _objects(data: dict[str, Any], key: str, where: str, noun: str,
             hint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(description, item) for each item of the list data[key], each checked to be an object.

    `where` describes `data` and `noun` one item: ("captions.json", "image") describes the
    fourth item as "captions.json: image #3".
    """
    for i, item in enumerate(_field(data, key, list, where, hint)):
        if not isinstance(item, dict):
            raise UserError(f"{where}: {noun} #{i} is {_json_type(item)}, not an object; {hint}")
        yield f"{where}: {noun} #{i}", item


def _field(item: dict[str, Any], key: str, types: type | tuple[type, ...], where: str,
           hint: str) -> Any:
    """item[key] if present and of `types` (never a bool), else a `UserError` saying where."""
    if key not in item:
        raise UserError(f"{where} has no {key!r} field; {hint}")
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(_JSON_TYPES[t] for t in (types if isinstance(types, tuple)
                                                        else (types,)))
        raise UserError(f"{where}: {key!r} is {_json_type(value)}, expected {expected}; {hint}")
    return value


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _id_key(image_id: str) -> tuple[int, int, str]:
    """Numeric ids sort as numbers, before any non-numeric ids, which sort as text."""
    return (0, int(image_id), "") if image_id.isdecimal() else (1, 0, image_id)
