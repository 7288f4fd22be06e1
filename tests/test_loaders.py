"""The COCO, Karpathy, Flickr8k and Conceptual Captions loaders on small files with the quirks
of the real ones, and the choices every dataset shares (--max_images, --min_caption_words)."""

import functools
import hashlib
import io
import json
import os
import re
import types
import zlib

import pytest
from PIL import Image

from dist_caption.data import sources
from dist_caption.data.coco import load_coco, load_karpathy
from dist_caption.data.conceptual import load_conceptual
from dist_caption.data.flickr8k import load_flickr8k
from dist_caption.data.records import (IN_NO_SPLIT, MISSING_FILE, NO_CAPTIONS, SAMPLE_SIZE,
                                       SPLITS, CaptionRecord, LoadReport, finalize,
                                       select)
from dist_caption.errors import UserError

CAFE = "un café près de la fenêtre"


@functools.cache
def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _jpeg(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(_jpeg_bytes())
    return str(path)


def _write(path, text: str, encoding: str = "utf-8", newline: str = "\n") -> str:
    with open(path, "w", encoding=encoding, newline=newline) as f:
        f.write(text)
    return str(path)


def _coco_json(path, images, annotations) -> str:
    """A COCO captions file: images [(id, file_name)], annotations [(id, image_id, caption)]."""
    return _write(path, json.dumps({
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f, "width": 8, "height": 8} for i, f in images],
        "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in annotations],
    }))


def _by_id(records):
    return {r.image_id: r for r in records}


# --------------------------------------------------------------------------------------- COCO


@pytest.mark.parametrize("year,name", [("2014", "COCO_{}2014_{:012d}.jpg"),
                                       ("2017", "{1:012d}.jpg")])
@pytest.mark.parametrize("nested", [True, False], ids=["official-folders", "flat"])
def test_coco_finds_images_in_both_folder_layouts(tmp_path, year, name, nested):
    images_dir = tmp_path / "images"
    files = {}
    for split, image_id in [("train", 9), ("train", 10), ("val", 3)]:
        file_name = name.format(split, image_id)
        folder = images_dir / f"{split}{year}" if nested else images_dir
        files[str(image_id)] = _jpeg(folder / file_name)
    train = _coco_json(tmp_path / f"captions_train{year}.json",
                       [(9, name.format("train", 9)), (10, name.format("train", 10))],
                       [(1, 9, "a dog"), (2, 10, "a cat"), (3, 10, "a cat again")])
    val = _coco_json(tmp_path / f"captions_val{year}.json", [(3, name.format("val", 3))],
                     [(4, 3, CAFE)])

    records = load_coco([train, val], str(images_dir))

    assert records == [
        CaptionRecord("9", files["9"], ("a dog",), "train"),
        CaptionRecord("10", files["10"], ("a cat", "a cat again"), "train"),
        CaptionRecord("3", files["3"], (CAFE,), "val"),
    ]


def test_coco_without_test_file_halves_val_by_sorted_id(tmp_path):
    ids = [12, 3, 7, 100, 5, 40]
    for i in ids:
        _jpeg(tmp_path / f"{i}.jpg")
    val = _coco_json(tmp_path / "captions_val2017.json", [(i, f"{i}.jpg") for i in ids],
                     [(n, i, f"caption {i}") for n, i in enumerate(ids)])

    records = load_coco([val], str(tmp_path))

    splits = {r.image_id: r.split for r in records}
    assert splits == {"3": "val", "5": "test", "7": "val", "12": "test", "40": "val",
                      "100": "test"}
    assert load_coco([val], str(tmp_path)) == records
    assert [r.image_id for r in records] == ["3", "7", "40", "5", "12", "100"]


def test_coco_explicit_split_overrides_the_file_name(tmp_path):
    for i in (1, 2, 3):
        _jpeg(tmp_path / f"{i}.jpg")
    train = _coco_json(tmp_path / "captions_train2017.json", [(1, "1.jpg")], [(1, 1, "a")])
    val = _coco_json(tmp_path / "captions_val2017.json", [(2, "2.jpg")], [(2, 2, "b")])
    other = _coco_json(tmp_path / "captions.json", [(3, "3.jpg")], [(3, 3, "c")])

    records = load_coco([train, f"test={val}", f"val={other}"], str(tmp_path))

    assert {r.image_id: r.split for r in records} == {"1": "train", "2": "test", "3": "val"}


def test_coco_drops_empty_captions_and_images_without_captions(tmp_path):
    for i in (1, 2, 3):
        _jpeg(tmp_path / f"{i}.jpg")
    train = _coco_json(tmp_path / "captions_train2017.json",
                       [(1, "1.jpg"), (2, "2.jpg"), (3, "3.jpg")],
                       [(1, 1, "a dog on the grass  "), (2, 1, "  ...  "), (3, 2, "  ...  ")])
    report = LoadReport()

    records = load_coco([train], str(tmp_path), report)

    assert records == [CaptionRecord("1", str(tmp_path / "1.jpg"),
                                     ("a dog on the grass  ",), "train")]
    assert report.empty_captions == 2
    assert sorted(report.images_without_captions) == ["2", "3"]


def test_coco_merges_duplicate_ids_and_warns_once(tmp_path, caplog):
    _jpeg(tmp_path / "7.jpg")
    _jpeg(tmp_path / "8.jpg")
    train = _coco_json(tmp_path / "captions_train2017.json",
                       [(7, "7.jpg"), (7, "7.jpg"), (8, "8.jpg")], [(1, 7, "a"), (2, 8, "c")])
    val = _coco_json(tmp_path / "captions_val2017.json", [(7, "7.jpg"), (8, "8.jpg")],
                     [(3, 7, "b"), (4, 8, "d")])
    report = LoadReport()

    records = load_coco([train, val], str(tmp_path), report)

    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("7", ("a", "b"), "train"), ("8", ("c", "d"), "train")]
    assert report.duplicate_ids == ["7", "8"]
    assert len([r for r in caplog.records if "more than once" in r.getMessage()]) == 1


def test_coco_skips_annotation_of_unknown_image_with_warning(tmp_path, caplog):
    _jpeg(tmp_path / "1.jpg")
    train = _coco_json(tmp_path / "captions_train2017.json", [(1, "1.jpg")],
                       [(1, 1, "a"), (55, 999, "orphan")])

    report = LoadReport()
    records = load_coco([train], str(tmp_path), report)

    assert [r.captions for r in records] == [("a",)]
    assert "captions_train2017.json: annotation #1 (id 55) refers to image 999" in caplog.text
    assert report.orphan_captions == 1


def test_coco_missing_image_is_reported_not_fatal(tmp_path):
    _jpeg(tmp_path / "1.jpg")
    train = _coco_json(tmp_path / "captions_train2017.json", [(1, "1.jpg"), (2, "2.jpg")],
                       [(1, 1, "a"), (2, 2, "b")])
    report = LoadReport()

    records = load_coco([train], str(tmp_path), report)

    assert [r.image_id for r in records] == ["1"]
    assert [image_id for image_id, _ in report.missing_images] == ["2"]
    assert str(tmp_path / "2.jpg") in report.missing_images[0][1]


# ----------------------------------------------------------------------------------- Karpathy


def _karpathy_image(image_id, filename, split, sentences, filepath=None, key="cocoid"):
    image = {key: image_id, "filename": filename, "split": split,
             "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sentences]}
    if filepath:
        image["filepath"] = filepath
    return image


def test_karpathy_reads_splits_paths_and_captions(tmp_path):
    paths = [_jpeg(tmp_path / "train2014" / "a.jpg"), _jpeg(tmp_path / "val2014" / "b.jpg"),
             _jpeg(tmp_path / "val2014" / "c.jpg"), _jpeg(tmp_path / "val2014" / "d.jpg")]
    tokens_only = {"tokens": ["two", "birds"]}
    images = [
        _karpathy_image(4, "a.jpg", "train", [CAFE, "a cup  "], "train2014"),
        _karpathy_image(3, "b.jpg", "restval", ["b"], "val2014"),
        _karpathy_image(2, "c.jpg", "val", ["c"], "val2014"),
        _karpathy_image(1, "d.jpg", "test", [], "val2014") | {"sentences": [tokens_only]},
    ]
    path = _write(tmp_path / "dataset_coco.json", json.dumps({"dataset": "coco",
                                                              "images": images}))

    records = load_karpathy(path, str(tmp_path))

    assert records == [
        CaptionRecord("3", paths[1], ("b",), "train"),
        CaptionRecord("4", paths[0], (CAFE, "a cup  "), "train"),
        CaptionRecord("2", paths[2], ("c",), "val"),
        CaptionRecord("1", paths[3], ("two birds",), "test"),
    ]


def test_karpathy_flickr_style_uses_imgid_and_no_filepath(tmp_path):
    path_a = _jpeg(tmp_path / "1000_a.jpg")
    images = [_karpathy_image(0, "1000_a.jpg", "train", ["a dog"], key="imgid")]
    path = _write(tmp_path / "dataset_flickr8k.json", json.dumps({"images": images}))

    assert load_karpathy(path, str(tmp_path)) == [
        CaptionRecord("0", path_a, ("a dog",), "train")]


def test_karpathy_missing_images_are_reported_and_skipped(tmp_path):
    _jpeg(tmp_path / "val2014" / "here.jpg")
    images = [_karpathy_image(1, "here.jpg", "val", ["a"], "val2014"),
              _karpathy_image(2, "gone.jpg", "val", ["b"], "val2014"),
              _karpathy_image(3, "gone_too.jpg", "test", ["c"], "val2014")]
    path = _write(tmp_path / "dataset_coco.json", json.dumps({"images": images}))
    report = LoadReport()

    records = load_karpathy(path, str(tmp_path), report)

    assert [r.image_id for r in records] == ["1"]
    assert [image_id for image_id, _ in report.missing_images] == ["2", "3"]


# ------------------------------------------------------------------------------- JSON errors


def _annotations_with(broken: dict) -> dict:
    """A COCO file whose annotation #3 is `broken`."""
    good = [{"id": 10 + n, "image_id": 1, "caption": "a"} for n in range(3)]
    return {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": good + [broken]}


@pytest.mark.parametrize("content,expected", [
    (_annotations_with({"id": 17, "image_id": 1}),
     "captions_train2017.json: annotation #3 (id 17) has no 'caption' field; "
     "is this a COCO captions file?"),
    (_annotations_with({"id": 17, "image_id": 1, "caption": 5}),
     "captions_train2017.json: annotation #3 (id 17): 'caption' is an integer, expected a "
     "string; is this a COCO captions file?"),
    (_annotations_with({"id": 17, "caption": "a"}),
     "captions_train2017.json: annotation #3 (id 17) has no 'image_id' field"),
    (_annotations_with({"image_id": 1}), "captions_train2017.json: annotation #3 has no"),
    (_annotations_with("a caption"),
     "captions_train2017.json: annotation #3 is a string, not an object"),
    ({"images": [{"file_name": "1.jpg"}], "annotations": []},
     "captions_train2017.json: image #0 has no 'id' field"),
    ({"images": [{"id": 1}], "annotations": []},
     "captions_train2017.json: image #0 (id 1) has no 'file_name' field"),
    ({"images": [{"id": 1.5, "file_name": "x"}], "annotations": []},
     "captions_train2017.json: image #0: 'id' is a number, expected an integer or a string"),
    ({"images": []}, "captions_train2017.json: no top-level 'annotations' list; "
                     "is this a COCO captions file?"),
    ([1, 2], "captions_train2017.json: the top level is a list, not an object"),
])
def test_coco_errors_name_the_file_and_record(tmp_path, content, expected):
    path = _write(tmp_path / "captions_train2017.json", json.dumps(content))
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        load_coco([path], str(tmp_path))


def test_invalid_json_error_gives_line_and_column(tmp_path):
    path = _write(tmp_path / "captions_val2014.json", '{"images": [],\n"annotations": [\n  {,}]}')
    with pytest.raises(UserError, match=r"^captions_val2014\.json: not valid JSON at line 3 "
                                        r"column 4"):
        load_coco([path], str(tmp_path))


def test_missing_file_error_names_the_path(tmp_path):
    path = str(tmp_path / "captions_train2017.json")
    with pytest.raises(UserError, match=f"^{re.escape(path)}: no such file"):
        load_coco([path], str(tmp_path))
    with pytest.raises(UserError, match=f"^{re.escape(path)}: no such file"):
        load_karpathy(path, str(tmp_path))


def test_coco_needs_a_file_and_utf8(tmp_path):
    with pytest.raises(UserError, match="^no COCO captions file given"):
        load_coco([], str(tmp_path))
    path = tmp_path / "captions_train2017.json"
    path.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        load_coco([str(path)], str(tmp_path))


def test_coco_file_name_without_split_asks_for_an_explicit_one(tmp_path):
    path = _coco_json(tmp_path / "captions.json", [], [])
    with pytest.raises(UserError, match=f"^{re.escape(path)}: cannot tell the split .*'train="):
        load_coco([path], str(tmp_path))


@pytest.mark.parametrize("image,expected", [
    ({"cocoid": 17, "split": "val", "sentences": []},
     "dataset_coco.json: image #1 (id 17) has no 'filename' field; "
     "is this a Karpathy split file (dataset_coco.json)?"),
    ({"filename": "x.jpg", "split": "val", "sentences": []},
     "dataset_coco.json: image #1 has neither a 'cocoid' nor an 'imgid' field"),
    ({"cocoid": 17, "filename": "x.jpg", "split": "dev", "sentences": []},
     "dataset_coco.json: image #1 (id 17) has split 'dev', expected one of train, restval, "
     "val, test"),
    ({"cocoid": 17, "filename": "x.jpg", "split": "val", "sentences": [{"raw": "a"}, {}]},
     "dataset_coco.json: image #1 (id 17): sentence #1 has no 'tokens' field"),
    ({"cocoid": 17, "filename": "x.jpg", "split": "val", "sentences": [{"tokens": ["a", 1]}]},
     "dataset_coco.json: image #1 (id 17): sentence #0: 'tokens' must be a list of strings"),
    ({"cocoid": 17, "filename": "x.jpg", "filepath": 2014, "split": "val", "sentences": []},
     "dataset_coco.json: image #1 (id 17): 'filepath' is an integer, expected a string"),
    ({"cocoid": 17, "filename": "x.jpg", "split": "val"},
     "dataset_coco.json: image #1 (id 17) has no 'sentences' field"),
])
def test_karpathy_errors_name_the_file_and_record(tmp_path, image, expected):
    good = _karpathy_image(1, "a.jpg", "train", ["a"])
    path = _write(tmp_path / "dataset_coco.json", json.dumps({"images": [good, image]}))
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        load_karpathy(path, str(tmp_path))


# ----------------------------------------------------------------------------------- Flickr8k

_FLICKR = [("1000_a.jpg", ["A child in a pink dress .", "A girl, smiling, on stairs .",
                           CAFE]),
           ("1001_b.jpg", ["A dog runs .", "Two dogs"]),
           ("1002_c.jpg", ["A boat"])]


def _flickr_token_txt(path, rows=_FLICKR) -> str:
    lines = [f"{image}#{n}\t{caption}  " for image, captions in rows
             for n, caption in enumerate(captions)]
    return _write(path, "\ufeff" + "\n".join(lines) + "\n\n", newline="\r\n")


def _flickr_captions_txt(path, rows=_FLICKR) -> str:
    lines = ["image,caption"]
    for image, captions in rows:
        for caption in captions:
            lines.append(f'{image},"{caption}"' if caption.startswith("A girl")
                         else f"{image},{caption}")
    return _write(path, "\n".join(lines) + "\n")


def _flickr_images(image_dir, rows=_FLICKR) -> None:
    for image, _ in rows:
        _jpeg(image_dir / image)


def _split_files(folder, train, dev, test) -> None:
    for name, images in [("Flickr_8k.trainImages.txt", train), ("Flickr_8k.devImages.txt", dev),
                         ("Flickr_8k.testImages.txt", test)]:
        _write(folder / name, "".join(f"{image} \r\n" for image in images))


def test_flickr8k_both_layouts_give_the_same_records(tmp_path):
    _flickr_images(tmp_path / "Images")
    _split_files(tmp_path, ["1000_a.jpg", "1001_b.jpg"], ["1002_c.jpg"], [])
    token = _flickr_token_txt(tmp_path / "Flickr8k.token.txt")
    csv_file = _flickr_captions_txt(tmp_path / "captions.txt")

    from_token = load_flickr8k(token, str(tmp_path / "Images"))
    from_csv = load_flickr8k(csv_file, str(tmp_path / "Images"))

    assert from_token == from_csv == [
        CaptionRecord("1000_a.jpg", str(tmp_path / "Images" / "1000_a.jpg"),
                      ("A child in a pink dress .", "A girl, smiling, on stairs .", CAFE),
                      "train"),
        CaptionRecord("1001_b.jpg", str(tmp_path / "Images" / "1001_b.jpg"),
                      ("A dog runs .", "Two dogs"), "train"),
        CaptionRecord("1002_c.jpg", str(tmp_path / "Images" / "1002_c.jpg"), ("A boat",), "val"),
    ]


def test_flickr8k_unquoted_commas_stay_in_the_caption(tmp_path):
    _jpeg(tmp_path / "x.jpg")
    path = _write(tmp_path / "captions.txt", "image,caption\nx.jpg,a dog, a cat, and a bird\n")
    records = load_flickr8k(path, str(tmp_path))
    assert records[0].captions == ("a dog, a cat, and a bird",)


def test_flickr8k_split_files_skip_unlisted_images(tmp_path, caplog):
    _flickr_images(tmp_path / "Images")
    splits = tmp_path / "splits"
    splits.mkdir()
    _split_files(splits, ["1000_a.jpg"], [], ["1002_c.jpg", "9999_not_captioned.jpg"])
    token = _flickr_token_txt(tmp_path / "Flickr8k.token.txt")

    report = LoadReport()
    records = load_flickr8k(token, str(tmp_path / "Images"), splits_dir=str(splits),
                            report=report)

    assert [(r.image_id, r.split) for r in records] == [("1000_a.jpg", "train"),
                                                        ("1002_c.jpg", "test")]
    assert "1 images of" in caplog.text and "1001_b.jpg" in caplog.text
    assert report.unlisted_images == ["1001_b.jpg"]


def test_flickr8k_drops_empty_captions_and_reports_missing_images(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    path = _write(tmp_path / "Flickr8k.token.txt",
                  "a.jpg#0\tA dog\na.jpg#1\t  ...  \nb.jpg#0\tA cat\nc.jpg#0\t\n")
    _split_files(tmp_path, ["a.jpg", "b.jpg", "c.jpg"], [], [])
    report = LoadReport()

    records = load_flickr8k(path, str(tmp_path), report=report)

    assert [(r.image_id, r.captions) for r in records] == [("a.jpg", ("A dog",))]
    assert report.empty_captions == 2
    assert report.images_without_captions == ["c.jpg"]
    assert [image_id for image_id, _ in report.missing_images] == ["b.jpg"]


def test_flickr8k_hash_split_is_pinned_and_75_12_12(tmp_path):
    """The split of a name never changes: not with the process, the machine or the subset."""
    names = [f"{1000 + i}_{i * 7919 % 100003:x}.jpg" for i in range(400)]
    for name in names:
        _jpeg(tmp_path / name)
    rows = [(name, ["a photo"]) for name in names]
    path = _flickr_captions_txt(tmp_path / "captions.txt", rows)

    (tmp_path / "subset").mkdir()
    subset = _flickr_captions_txt(tmp_path / "subset" / "captions.txt", rows[::3])

    splits = {r.image_id: r.split for r in load_flickr8k(path, str(tmp_path))}

    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 311, "val": 46, "test": 43}
    assert [splits[name] for name in names[:8]] == ["train"] * 5 + ["val", "train", "train"]
    sub_splits = {r.image_id: r.split for r in load_flickr8k(subset, str(tmp_path))}
    assert sub_splits == {name: splits[name] for name in names[::3]}


@pytest.mark.parametrize("content,expected", [
    ("a.jpg#0\tA dog\na.jpg A cat\n", "Flickr8k.token.txt line 2: expected 'name.jpg#0<TAB>"),
    ("a.jpg#0\tA dog\n\na.jpg\tA cat\n", "Flickr8k.token.txt line 3: expected 'name.jpg#0<TAB>"),
    ("image,caption\na.jpg,A dog\nb.jpg\n", "Flickr8k.token.txt line 3: expected 'image,caption'"),
    ("a.jpg A dog\n", "Flickr8k.token.txt line 1: expected the header 'image,caption' or"),
    ("\n \n", "Flickr8k.token.txt: no captions in the file"),
])
def test_flickr8k_malformed_lines_name_file_and_line(tmp_path, content, expected):
    path = _write(tmp_path / "Flickr8k.token.txt", content)
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        load_flickr8k(path, str(tmp_path))


def test_flickr8k_split_file_errors(tmp_path):
    path = _flickr_token_txt(tmp_path / "Flickr8k.token.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(empty / "Flickr_8k.trainImages.txt")
    with pytest.raises(UserError, match=f"^{re.escape(missing)}: no such file"):
        load_flickr8k(path, str(tmp_path), splits_dir=str(empty))

    _split_files(tmp_path, ["1000_a.jpg"], [], ["1001_b.jpg", "1000_a.jpg"])
    with pytest.raises(UserError, match=r"^Flickr_8k\.testImages\.txt line 2: 1000_a\.jpg is "
                                        r"also in Flickr_8k\.trainImages\.txt"):
        load_flickr8k(path, str(tmp_path))


# ------------------------------------------------------------------------ Conceptual Captions

_CC_TRAIN = [("a dog on a beach", "http://img.example.com/dog.jpg"),
             ("actor attends the premiere .", "https://cdn.example.org/a/b.png?w=500"),
             (CAFE, "http://example.net/gone.jpg"),  # never downloaded
             ("  ...  ", "http://example.net/empty.jpg")]
_CC_VAL = [(f"a view of place {i}", f"http://val.example.com/{i}.jpg") for i in range(6)]


def _cc_tsv(path, rows, header: bool = False) -> str:
    """A TSV as Google publishes it (caption<TAB>URL, no header), or with img2dataset's header."""
    lines = (["caption\turl"] if header else []) + [f"{c}\t{u}" for c, u in rows]
    return _write(path, "\n".join(lines) + "\n")


def _sha1(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


def _cc_sha1_images(image_dir, rows, folder: str, skip=("gone",)) -> dict[str, str]:
    """The TensorFlow tutorial's layout: <folder>/<sha1 of the URL>.<ext>; id -> path."""
    paths = {}
    for n, (_, url) in enumerate(rows):
        if not any(s in url for s in skip):
            name = f"{_sha1(url)}{('.jpeg', '.jpg', '.png', '.webp')[n % 4]}"
            paths[_sha1(url)] = _jpeg(image_dir / folder / name)
    return paths


def test_conceptual_url_sha1_names_find_images_in_any_subfolder(tmp_path):
    images = tmp_path / "conceptual_captions"
    train = _cc_tsv(tmp_path / "Train_GCC-training.tsv", _CC_TRAIN)
    val = _cc_tsv(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", _CC_VAL)
    paths = {**_cc_sha1_images(images, _CC_TRAIN, "train"),
             **_cc_sha1_images(images, _CC_VAL, "val")}
    report = LoadReport()

    records = load_conceptual(train, val, str(images), "url_sha1", report)

    by_id = _by_id(records)
    assert set(by_id) == set(paths) - {_sha1(_CC_TRAIN[3][1])}
    assert by_id[_sha1(_CC_TRAIN[0][1])] == CaptionRecord(
        _sha1(_CC_TRAIN[0][1]), paths[_sha1(_CC_TRAIN[0][1])], ("a dog on a beach",), "train")
    assert by_id[_sha1(_CC_TRAIN[1][1])].image_path.endswith(".jpg")  # row 1: .jpg
    assert [r.split for r in records[:2]] == ["train", "train"]
    assert {r.split for r in records[2:]} == {"val", "test"}
    gone = _sha1(_CC_TRAIN[2][1])
    assert report.missing_images == [(gone, f"missing file {images / gone}.jpg")]
    assert report.empty_captions == 1
    assert report.images_without_captions == [_sha1(_CC_TRAIN[3][1])]


def test_conceptual_row_names_of_img2dataset_and_downloadconceptualcaptions(tmp_path):
    """img2dataset: train/<shard>/<row:09d>.jpg from a TSV given a header; the other
    downloader: validation/<row>_<crc32>, no extension. Same records as url_sha1 names."""
    images = tmp_path / "images"
    train = _cc_tsv(tmp_path / "Train_GCC-training.tsv", _CC_TRAIN, header=True)
    val = _cc_tsv(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", _CC_VAL)
    for row in (0, 1, 3):
        _jpeg(images / "train" / "00000" / f"{row:09d}.jpg")
    _write(images / "train" / "00000" / "000000001.txt", "not an image")
    _write(images / "train" / "00000_stats.json", "{}")
    for row, (_, url) in enumerate(_CC_VAL):
        if row != 4:
            _jpeg(images / "validation" / f"{row}_{zlib.crc32(url.encode())}")
    by_sha1 = tmp_path / "by_sha1"
    _cc_sha1_images(by_sha1, _CC_TRAIN + _CC_VAL, "", skip=("gone", "/4.jpg"))
    report = LoadReport()

    records = load_conceptual(train, val, str(images), "row", report)

    assert _by_id(records)[_sha1(_CC_TRAIN[0][1])].image_path == str(
        images / "train" / "00000" / "000000000.jpg")
    assert _by_id(records)[_sha1(_CC_VAL[5][1])].image_path == str(
        images / "validation" / f"5_{zlib.crc32(_CC_VAL[5][1].encode())}")
    missing = {image_id: reason for image_id, reason in report.missing_images}
    assert missing == {
        _sha1(_CC_TRAIN[2][1]): f"missing file {images / 'train' / '000000002.jpg'}",
        _sha1(_CC_VAL[4][1]): f"missing file {images / 'validation' / '000000004.jpg'}"}
    same = load_conceptual(train, val, str(by_sha1), "url_sha1")
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        (r.image_id, r.captions, r.split) for r in same]


def test_conceptual_row_names_need_a_folder_per_tsv(tmp_path):
    train = _cc_tsv(tmp_path / "Train_GCC-training.tsv", _CC_TRAIN[:2])
    val = _cc_tsv(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", _CC_VAL[:2])
    for row in (0, 1):
        _jpeg(tmp_path / "flat" / f"{row:09d}.jpg")
    with pytest.raises(UserError, match=r"^--cc_image_names=row: row numbers restart in each "
                                        r"TSV.*put the training images in .*flat/train"):
        load_conceptual(train, val, str(tmp_path / "flat"), "row")
    only_train = load_conceptual(train, None, str(tmp_path / "flat"), "row")
    assert sorted(r.image_path for r in only_train) == [
        str(tmp_path / "flat" / f"{row:09d}.jpg") for row in (0, 1)]


def test_conceptual_val_halves_are_pinned_per_image(tmp_path):
    """An image's val/test half depends on its URL alone, not on the other lines."""
    rows = [(f"a photo {i}", f"http://val.example.com/{i}.jpg") for i in range(200)]
    _cc_sha1_images(tmp_path / "images", rows, "")
    train = _cc_tsv(tmp_path / "train.tsv", rows[:1])
    val = _cc_tsv(tmp_path / "val.tsv", rows)
    subset = _cc_tsv(tmp_path / "subset.tsv", rows[::7])

    splits = {r.image_id: r.split for r in load_conceptual(train, val, str(tmp_path / "images"))
              if r.split != "train"}
    sub = {r.image_id: r.split for r in load_conceptual(train, subset, str(tmp_path / "images"))
           if r.split != "train"}

    assert list(splits.values()).count("val") == 106 and len(splits) == 199
    assert [splits[_sha1(u)] for _, u in rows[1:7]] == ["val", "val", "test", "test", "val",
                                                        "test"]
    assert sub == {_sha1(u): splits[_sha1(u)] for _, u in rows[::7] if _sha1(u) in splits}


def test_conceptual_repeated_url_is_one_image_with_both_captions(tmp_path):
    url = "http://img.example.com/dog.jpg"
    train = _cc_tsv(tmp_path / "train.tsv", [("a dog", url), ("a brown dog", url)])
    _jpeg(tmp_path / "images" / f"{_sha1(url)}.jpg")
    report = LoadReport()
    records = load_conceptual(train, None, str(tmp_path / "images"), report=report)
    assert [(r.image_id, r.captions) for r in records] == [(_sha1(url), ("a dog", "a brown dog"))]
    assert report.duplicate_ids == [_sha1(url)]


@pytest.mark.parametrize("content,expected", [
    ("a dog\thttp://x/1.jpg\na cat http://x/2.jpg\n",
     "bad.tsv line 2: expected 'caption<TAB>URL', got 'a cat http://x/2.jpg'"),
    ("a dog\thttp://x/1.jpg\n\na cat\t\n", "bad.tsv line 3: expected 'caption<TAB>URL'"),
    ("http://x/1.jpg\ta dog\n", "bad.tsv line 1: expected 'caption<TAB>URL', got "
                                "'http://x/1.jpg\\ta dog'; is this Conceptual Captions'"),
    ("caption\turl\n\n", "bad.tsv: no captions in the file"),
    (b"a dog\thttp://x/1.jpg\ncaf\xe9\thttp://x/2.jpg\n",
     "bad.tsv line 2: not UTF-8 text (bad byte at column 4); save it as UTF-8"),
])
def test_conceptual_bad_lines_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        load_conceptual(str(path), None, str(tmp_path))


def test_conceptual_missing_tsv_and_unreadable_folder(tmp_path, monkeypatch):
    train = _cc_tsv(tmp_path / "train.tsv", _CC_TRAIN[:1])
    missing = str(tmp_path / "Train_GCC-training.tsv")
    with pytest.raises(UserError, match=f"^{re.escape(missing)}: no such file; check the path"):
        load_conceptual(missing, None, str(tmp_path))
    with pytest.raises(UserError, match=f"^{re.escape(train)}: not a folder; pass the folder "
                                        f"of the downloaded images as --image_dir"):
        load_conceptual(train, None, train)

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}: cannot list the image "
                                        r"folder \(Permission denied\); check its permissions"):
        load_conceptual(train, None, str(tmp_path))


# ------------------------------------------- every dataset: --max_images, --min_caption_words


def _dataset_flags(tmp_path, dataset: str, **selection) -> types.SimpleNamespace:
    """The data flags of `dataset` over 10 train and 6 validation images written here."""
    urls = [f"http://x/{i}.jpg" for i in range(16)]
    names = ([f"{_sha1(url)}.jpg" for url in urls] if dataset == "conceptual"
             else [f"{i:012d}.jpg" for i in range(16)])
    images = tmp_path / "images"
    for name in names:
        if not (images / name).exists():
            _jpeg(images / name)
    captions = [f"a photo of thing number {i}" for i in range(16)]
    flags = {"dataset": dataset, "image_dir": str(images), "max_images": 0,
             "min_caption_words": 0, **selection}
    if dataset == "coco":
        flags["captions_json"] = [
            _coco_json(tmp_path / f"captions_{split}2017.json",
                       [(i, names[i]) for i in ids], [(i, i, captions[i]) for i in ids])
            for split, ids in (("train", range(10)), ("val", range(10, 16)))]
    elif dataset == "karpathy":
        flags["karpathy_json"] = _write(tmp_path / "dataset_coco.json", json.dumps({"images": [
            _karpathy_image(i, names[i], "train" if i < 10 else ("val", "test")[i % 2],
                            [captions[i]]) for i in range(16)]}))
    elif dataset == "flickr8k":
        flags["flickr8k_captions"] = _flickr_captions_txt(
            tmp_path / "captions.txt", [(names[i], [captions[i]]) for i in range(16)])
        flags["flickr8k_splits_dir"] = None
    else:
        rows = list(zip(captions, urls))
        flags.update(cc_train_tsv=_cc_tsv(tmp_path / "train.tsv", rows[:10]),
                     cc_val_tsv=_cc_tsv(tmp_path / "val.tsv", rows[10:]),
                     cc_image_names="url_sha1")
    return types.SimpleNamespace(**flags)


@pytest.mark.parametrize("dataset", ["coco", "karpathy", "flickr8k", "conceptual"])
@pytest.mark.setting("max_images")
def test_max_images_is_a_fixed_sample_per_split(tmp_path, dataset):
    full, _ = sources.load_records(_dataset_flags(tmp_path, dataset))
    three, report = sources.load_records(_dataset_flags(tmp_path, dataset, max_images=3))
    two, _ = sources.load_records(_dataset_flags(tmp_path, dataset, max_images=2))

    counts = {s: sum(r.split == s for r in full) for s in SPLITS}
    assert {s: sum(r.split == s for r in three) for s in SPLITS} == {
        s: min(3, n) for s, n in counts.items()}
    assert report.over_max_images == {s: n - 3 for s, n in counts.items() if n > 3}
    assert "images over --max_images left out" in report.summary()
    assert set(two) <= set(three) <= set(full)
    assert [r for r in full if r in set(three)] == three  # the loader's order is kept
    assert sources.load_records(_dataset_flags(tmp_path, dataset, max_images=3))[0] == three


def test_max_images_sample_is_pinned(tmp_path):
    records, _ = sources.load_records(_dataset_flags(tmp_path, "coco", max_images=2))
    assert [(r.image_id, r.split) for r in records] == [
        ("8", "train"), ("9", "train"), ("10", "val"), ("12", "val"), ("11", "test"),
        ("13", "test")]


def test_min_caption_words_drops_short_captions_and_counts_them():
    records = [CaptionRecord("1", "1.jpg", ("A dog.", "a dog runs , on grass", "  ...  "),
                             "train"),
               CaptionRecord("2", "2.jpg", ("two - dogs !",), "train"),
               CaptionRecord("3", "3.jpg", ("the three small cats",), "val")]
    report = LoadReport()

    kept = select(records, report, min_caption_words=3)

    assert [(r.image_id, r.captions) for r in kept] == [
        ("1", ("a dog runs , on grass",)), ("3", ("the three small cats",))]
    assert report.short_captions == 3  # "  ...  " has 0 words
    assert report.images_without_captions == ["2"]
    assert "3 short captions dropped" in report.summary()
    assert select(records, LoadReport()) == records


def test_the_report_lists_each_skipped_image_with_its_split_and_counts_the_rest(tmp_path):
    """What a cache writes to `skipped.jsonl` (`skipped`) and keeps in its manifest (`counts`:
    numbers, however many images a web dataset misses)."""
    _jpeg(tmp_path / "a.jpg")
    records = [CaptionRecord("a", str(tmp_path / "a.jpg"), ("a red dog",), "train"),
               CaptionRecord("b", str(tmp_path / "b.jpg"), ("a cat",), "val"),
               CaptionRecord("c", str(tmp_path / "c.jpg"), ("  ...  ",), "test"),
               CaptionRecord("d", str(tmp_path / "a.jpg"), ("short",), "val")]
    report = LoadReport(unlisted_images=["z.jpg"], duplicate_ids=[str(i) for i in range(50)])
    select(finalize(records, report), report, min_caption_words=2)
    assert report.skipped() == [
        {"image_id": "b", "split": "val", "reason": MISSING_FILE,
         "detail": f"missing file {tmp_path / 'b.jpg'}"},
        {"image_id": "c", "split": "test", "reason": NO_CAPTIONS},
        {"image_id": "d", "split": "val", "reason": NO_CAPTIONS},
        {"image_id": "z.jpg", "reason": IN_NO_SPLIT}]
    counts = report.counts()
    assert {k: counts[k] for k in ("missing_images", "images_without_captions",
                                   "unlisted_images", "duplicate_ids", "short_captions",
                                   "empty_captions")} == {
        "missing_images": 1, "images_without_captions": 2, "unlisted_images": 1,
        "duplicate_ids": 50, "short_captions": 1, "empty_captions": 1}
    assert counts["duplicate_ids_sample"] == [str(i) for i in range(SAMPLE_SIZE)]
    assert "splits" not in counts
    json.dumps(counts)


@pytest.mark.setting("min_caption_words")
def test_min_caption_words_applies_to_every_dataset(tmp_path):
    flags = _dataset_flags(tmp_path, "conceptual", min_caption_words=7)
    records, report = sources.load_records(flags)
    assert records == [] and report.short_captions == 16
    assert len(report.images_without_captions) == 16


@pytest.mark.setting("flickr8k_splits_dir")
def test_flickr8k_splits_dir_gives_the_splits_of_its_files(tmp_path):
    flags = _dataset_flags(tmp_path, "flickr8k")
    names = [f"{i:012d}.jpg" for i in range(16)]
    hashed = {r.image_id: r.split for r in sources.load_records(flags)[0]}
    splits = tmp_path / "splits"
    splits.mkdir()
    _split_files(splits, names[8:14], names[:4], names[4:8])  # 2 images in no split file
    flags.flickr8k_splits_dir = str(splits)
    records, report = sources.load_records(flags)
    listed = {r.image_id: r.split for r in records}
    want = {**{n: "train" for n in names[8:14]}, **{n: "val" for n in names[:4]},
            **{n: "test" for n in names[4:8]}}
    assert listed == want
    assert sorted(report.unlisted_images) == names[14:]
    assert hashed != listed  # without the files: the hash split
