"""The one record type every data source produces, and the cleaning they all share."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
from typing import Iterable, Sequence

from dist_caption import config
from dist_caption.data import text

SPLITS = config.SPLITS
# Why an image the source lists is not in the records (the `reason` of `LoadReport.skipped`).
MISSING_FILE, NO_CAPTIONS, IN_NO_SPLIT = "missing_file", "no_captions", "in_no_split"
SAMPLE_SIZE = 20  # ids a manifest shows of a list it otherwise only counts


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
    short_captions: int = 0  # fewer words than the minimum caption length
    # split -> images left out because the split already had its `max_images`
    over_max_images: dict[str, int] = dataclasses.field(default_factory=dict)
    # image id -> split, for the missing images and images without captions (their split is
    # known; an unlisted image has none)
    splits: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{len(self.missing_images)} missing images skipped, "
            f"{len(self.images_without_captions)} images without captions skipped, "
            f"{self.empty_captions} empty captions dropped, "
            f"{len(self.duplicate_ids)} duplicate ids merged, "
            f"{self.orphan_captions} captions of unknown images dropped, "
            f"{len(self.unlisted_images)} images in no split skipped, "
            f"{self.short_captions} short captions dropped, "
            f"{sum(self.over_max_images.values())} images over --max_images left out"
        )

    def skipped(self) -> list[dict]:
        """One entry per image skipped, in a stable order (missing files, then images without
        captions, then images in no split, each in the order the loader met them):
        `image_id`, `split` (when known), `reason` (`MISSING_FILE`, `NO_CAPTIONS`,
        `IN_NO_SPLIT`) and, for a missing file, `detail` (which file)."""
        def entry(image_id: str, reason: str, detail: str | None = None) -> dict:
            out = {"image_id": image_id}
            if image_id in self.splits:
                out["split"] = self.splits[image_id]
            out["reason"] = reason
            if detail:
                out["detail"] = detail
            return out

        return ([entry(i, MISSING_FILE, detail) for i, detail in self.missing_images]
                + [entry(i, NO_CAPTIONS) for i in self.images_without_captions]
                + [entry(i, IN_NO_SPLIT) for i in self.unlisted_images])

    def counts(self) -> dict:
        """The report with every list replaced by its length (what a cache's manifest keeps;
        `skipped` lists the images, and a few of the duplicate ids are shown)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "splits":
                out[field.name] = len(value) if isinstance(value, list) else value
        out["duplicate_ids_sample"] = self.duplicate_ids[:SAMPLE_SIZE]
        return out


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
            report.splits[record.image_id] = record.split
            continue
        if check_files and not os.path.isfile(record.image_path):
            missing.append((record.image_id, f"missing file {record.image_path}"))
            report.splits[record.image_id] = record.split
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


def select(records: Sequence[CaptionRecord], report: LoadReport, min_caption_words: int = 0,
           max_images: int = 0) -> list[CaptionRecord]:
    """The records with the dataset-wide choices applied, in their order; what goes is counted.

    Captions with fewer than `min_caption_words` words (after standardisation) are dropped
    (`report.short_captions`); an image left without captions is skipped
    (`report.images_without_captions`). Then each split keeps at most `max_images` images
    (0: all): those whose `stable_hash` of the image id is smallest, a pseudo-random sample that
    is the same on every run and machine and grows by adding images (the first 1,000 of a
    split are among its first 6,000). `report.over_max_images` counts the rest per split.
    """
    kept = list(records)
    if min_caption_words:
        kept = []
        for record in records:
            captions = tuple(c for c in record.captions
                             if len(text.standardize_py(c).split()) >= min_caption_words)
            report.short_captions += len(record.captions) - len(captions)
            if not captions:
                report.images_without_captions.append(record.image_id)
                report.splits[record.image_id] = record.split
                continue
            kept.append(dataclasses.replace(record, captions=captions))
    if not max_images:
        return kept
    by_split = collections.defaultdict(list)
    for record in kept:
        by_split[record.split].append(record.image_id)
    chosen = set()
    for split, ids in by_split.items():
        chosen.update(sorted(ids, key=stable_hash)[:max_images])
        if len(ids) > max_images:
            report.over_max_images[split] = len(ids) - max_images
            logging.info("%s: %d of %d images kept (--max_images)", split, max_images, len(ids))
    return [r for r in kept if r.image_id in chosen]
