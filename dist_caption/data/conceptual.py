"""Conceptual Captions (CC3M): Google's TSV files and a folder of the images a user downloaded.

    Train_GCC-training.tsv                 caption<TAB>URL, one image a line, no header -> train
    Validation_GCC-1.1.0-Validation.tsv    the same -> halved into val and test

Google publishes captions and URLs only; the images come from a downloader, which names each
file after its line. `IMAGE_NAMES` are the two naming schemes this loader matches:

    url_sha1   <sha1 hex of the URL>.jpg|.jpeg|.png|.webp anywhere below --image_dir: what the
               TensorFlow tutorial "Image captioning with visual attention" writes
               (conceptual_captions/train/<sha1>.jpeg, .../val/<sha1>.jpeg); by hand,
               `printf %s "$url" | sha1sum` names a file.
    row        the 0-based row of the line in its TSV (blank lines and a 'caption<TAB>url'
               header not counted): img2dataset --output_format files writes
               <shard>/<row, zero-padded>.jpg (with its default --number_sample_per_shard 10000,
               or any power of ten; it needs that header line, which is skipped here), and
               DownloadConceptualCaptions' download_data.py writes <row>_<crc32 of the URL>
               without an extension. Rows restart in each TSV, so each TSV's images are in their
               own folder: --image_dir/train (or training) and --image_dir/val (or validation).

Either way the image id is the sha1 hex of the URL, so the ids and the val/test halves are the
same under both schemes, and a URL listed twice is one image with both captions.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, Hashable, Iterator

from dist_caption import config
from dist_caption.data.coco import Images, open_error, sort_records
from dist_caption.data.records import CaptionRecord, LoadReport, finalize, hash_split
from dist_caption.errors import UserError

IMAGE_NAMES = config.CC_IMAGE_NAMES
# '' is a file without an extension (DownloadConceptualCaptions writes those).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", "")
_HINT = ("is this Conceptual Captions' Train_GCC-training.tsv or "
         "Validation_GCC-1.1.0-Validation.tsv?")
_URL = re.compile(r"https?://\S+$")
_SHA1_NAME = re.compile(r"[0-9a-fA-F]{40}")
_ROW_NAME = re.compile(r"(\d+)(?:_\d+)?")
_ROW_FOLDERS = {"train": ("train", "training"), "val": ("val", "validation")}


def url_id(url: str) -> str:
    """The image id of a URL: the sha1 hex digest of its UTF-8 bytes."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def load_conceptual(train_tsv: str, val_tsv: str | None, image_dir: str,
                    image_names: str = "url_sha1",
                    report: LoadReport | None = None) -> list[CaptionRecord]:
    """Loads Conceptual Captions; each line's image is found by `image_names` (see the module).

    The training TSV is the train split. The validation TSV's images are divided into val and
    test by a hash of their id (`hash_split`: half each, per image, so an image keeps its half
    whichever others were downloaded). Lines whose image is not in the folder are reported
    missing by `finalize`, at the path the scheme expects.
    """
    if image_names not in IMAGE_NAMES:
        raise ValueError(f"image_names must be one of {IMAGE_NAMES}, got {image_names!r}")
    report = LoadReport() if report is None else report
    tsvs = {"train": train_tsv, **({"val": val_tsv} if val_tsv else {})}
    images = Images()
    if image_names == "url_sha1":
        files = _image_files(image_dir, _sha1_key)
    for split, tsv in tsvs.items():
        if image_names == "row":
            folder = _row_folder(image_dir, split, len(tsvs))
            files = _image_files(folder, _row_key)
        for row, (caption, url) in enumerate(_read_tsv(tsv)):
            image_id = url_id(url)
            if image_names == "row":
                path = files.get(row) or os.path.join(folder, f"{row:09d}.jpg")
            else:
                path = files.get(image_id) or os.path.join(image_dir, f"{image_id}.jpg")
            images.add(image_id, path, split if split == "train"
                       else hash_split(image_id, ("val", "test"))).append(caption)
    return finalize(sort_records(images.records(report)), report)


def _read_tsv(path: str) -> Iterator[tuple[str, str]]:
    """(caption, URL) of each line, read line by line (the training TSV has 3.3M lines).

    Blank lines and a first line 'caption<TAB>url' (the header img2dataset needs) are skipped;
    columns after the URL are ignored. A line that is not 'caption<TAB>URL' is a `UserError`.
    """
    name = os.path.basename(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise open_error(path, e) from None
    rows = 0
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(f"{name} line {number}: not UTF-8 text (bad byte at column "
                                f"{e.start + 1}); save it as UTF-8") from None
            fields = [field.strip() for field in line.split("\t")]
            if not line.strip() or (rows == 0 and [f.lower() for f in fields[:2]] == [
                    "caption", "url"]):
                continue
            if len(fields) < 2 or not _URL.match(fields[1]):
                raise UserError(f"{name} line {number}: expected 'caption<TAB>URL', got "
                                f"{line[:60]!r}; {_HINT}")
            rows += 1
            yield fields[0], fields[1]
    if not rows:
        raise UserError(f"{name}: no captions in the file; {_HINT}")


def _image_files(folder: str, key_of: Callable[[str], Hashable | None]) -> dict:
    """key -> path of every image file below `folder` whose name `key_of` reads.

    The walk is sorted, so of two files with one key (a.jpg and a.png) the same one wins on
    every machine. A folder that cannot be listed is a `UserError`.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a folder; pass the folder of the downloaded images as "
                        f"--image_dir")

    def fail(error: OSError):
        raise UserError(f"{error.filename}: cannot list the image folder ({error.strerror}); "
                        f"check its permissions")

    files = {}
    for root, dirs, names in os.walk(folder, onerror=fail):
        dirs.sort()
        for name in sorted(names):
            stem, extension = os.path.splitext(name)
            if extension.lower() in IMAGE_EXTENSIONS:
                key = key_of(stem)
                if key is not None:
                    files.setdefault(key, os.path.join(root, name))
    return files


def _sha1_key(stem: str) -> str | None:
    return stem.lower() if _SHA1_NAME.fullmatch(stem) else None


def _row_key(stem: str) -> int | None:
    match = _ROW_NAME.fullmatch(stem)
    return int(match.group(1)) if match else None


def _row_folder(image_dir: str, split: str, tsv_count: int) -> str:
    """The folder of one TSV's images under the `row` scheme."""
    for name in _ROW_FOLDERS[split]:
        folder = os.path.join(image_dir, name)
        if os.path.isdir(folder):
            return folder
    if tsv_count == 1:
        return image_dir
    raise UserError(f"--cc_image_names=row: row numbers restart in each TSV, so each TSV's "
                    f"images need their own folder: put the training images in "
                    f"{os.path.join(image_dir, 'train')} and the validation images in "
                    f"{os.path.join(image_dir, 'val')}")
