"""The one record type every data source produces, and the cleaning they all share."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Iterable, Sequence

from dist_caption.data import text

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions.

    `image_id` is unique within a dataset (COCO's integer id as a string, or the Flickr8k file
    name). `captions` are the raw captions as the source wrote them; standardisation happens in
    `dist_caption.data.text`. `split` is one of `SPLITS`.
    """

    image_id: str
    image_path: str
    captions: tuple[str, ...]
    split: str


@dataclasses.dataclass
class LoadReport:
    """What a loader dropped and why, so nothing disappears silently."""

    missing_images: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    images_without_captions: list[str] = dataclasses.field(default_factory=list)
    empty_captions: int = 0
    duplicate_ids: list[str] = dataclasses.field(default_factory=list)
    orphan_captions: int = 0  # captions of an image id the file does not list
    unlisted_images: list[str] = dataclasses.field(default_factory=list)  # in no split file

    def summary(self) -> str:
        return (
            f"{len(self.missing_images)} missing images skipped, "
            f"{len(self.images_without_captions)} images without captions skipped, "
            f"{self.empty_captions} empty captions dropped, "
            f"{len(self.duplicate_ids)} duplicate ids merged, "
            f"{self.orphan_captions} captions of unknown images dropped, "
            f"{len(self.unlisted_images)} images in no split skipped"
        )


def finalize(records: Iterable[CaptionRecord], report: LoadReport,
             check_files: bool = True) -> list[CaptionRecord]:
    """Drops empty captions, images without captions and missing image files, counting each.

    Captions are judged empty after standardisation (`text.standardize_py`), so "  ...  " counts
    as empty. Missing files are recorded in `report.missing_images` and logged in one warning
    (a downloaded web dataset can miss hundreds of thousands).
    """
    kept, missing = [], []
    for record in records:
        captions = tuple(c for c in record.captions if text.standardize_py(c))
        report.empty_captions += len(record.captions) - len(captions)
        if not captions:
            report.images_without_captions.append(record.image_id)
            continue
        if check_files and not os.path.isfile(record.image_path):
            missing.append((record.image_id, f"missing file {record.image_path}"))
            continue
        kept.append(dataclasses.replace(record, captions=captions))
    if missing:
        logging.warning("%d images have no file (e.g. image %s: %s); skipped", len(missing),
                        *missing[0])
        report.missing_images.extend(missing)
    return kept


def stable_hash(key: str) -> bytes:
    """sha256 of `key`: the same in every process and on every machine (Python's `hash` is
    salted per process)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def hash_split(key: str, buckets: Sequence[str]) -> str:
    """One of `buckets` chosen by `key` alone: an image keeps its split whatever else the
    dataset holds (a subset, a newer version, a download that missed other images)."""
    return buckets[stable_hash(key)[0] % len(buckets)]

