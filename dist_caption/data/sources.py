"""One entry to every data source: the dataset flags -> caption records."""

from __future__ import annotations

import logging
import os

from dist_caption.data.records import SPLITS, CaptionRecord, LoadReport, select


def synthetic_records(synthetic_dir: str, num_images: int, seed: int, image_size: int,
                      report: LoadReport, strict: bool = True) -> list[CaptionRecord]:
    """The synthetic dataset's records, generating it first if `synthetic_dir` is not complete.

    A complete dataset made with other settings is a `UserError` if `strict` (a cache must not
    be built from other data than asked for), else used as it is, with a warning.
    """
    from dist_caption.data import coco, synthetic
    from dist_caption.errors import UserError

    if not synthetic.is_complete(synthetic_dir):
        logging.info("generating the synthetic dataset in %s", synthetic_dir)
        synthetic.generate(synthetic_dir, num_images, seed, image_size)
    made = synthetic.settings(synthetic_dir)
    wanted = {"num_images": num_images, "seed": seed, "image_size": image_size}
    if made != wanted:
        message = f"{synthetic_dir} holds a synthetic dataset made with {made}, not {wanted}"
        if strict:
            raise UserError(f"{message}: pass its --num_images, --synthetic_seed and "
                            f"--image_size to use it, or delete it (and the feature cache "
                            f"built from it) to make a new one")
        logging.warning("%s: using it as it is", message)
    files = [f"{split}={os.path.join(synthetic_dir, 'annotations', f'captions_{split}.json')}"
             for split in SPLITS]
    return coco.load_coco(files, os.path.join(synthetic_dir, "images"), report)


def load_records(values, strict: bool = True) -> tuple[list[CaptionRecord], LoadReport]:
    """Records of the dataset the flags (`define_dataset_flags`) name, and what was dropped;
    `strict`: see `synthetic_records`. `--min_caption_words` and `--max_images` apply to every
    dataset (`records.select`)."""
    from dist_caption.data import coco, conceptual, flickr8k

    report = LoadReport()
    if values.dataset == "synthetic":
        records = synthetic_records(values.synthetic_dir, values.num_images,
                                    values.synthetic_seed, values.image_size, report, strict)
    elif values.dataset == "coco":
        records = coco.load_coco(values.captions_json, values.image_dir, report)
    elif values.dataset == "karpathy":
        records = coco.load_karpathy(values.karpathy_json, values.image_dir, report)
    elif values.dataset == "flickr8k":
        records = flickr8k.load_flickr8k(values.flickr8k_captions, values.image_dir,
                                         values.flickr8k_splits_dir, report)
    else:
        records = conceptual.load_conceptual(values.cc_train_tsv, values.cc_val_tsv,
                                             values.image_dir, values.cc_image_names, report)
    records = select(records, report, values.min_caption_words, values.max_images)
    logging.info("%s: %d images (%s); %s", values.dataset, len(records),
                 ", ".join(f"{s} {sum(r.split == s for r in records)}" for s in SPLITS),
                 report.summary())
    return records, report


def source_settings(values) -> dict:
    """What a cache's manifest records about its source, beyond the records themselves: the
    synthetic dataset's folder (evaluation scores captions against its scenes) and the
    settings that chose the records."""
    source = {"max_images": values.max_images, "min_caption_words": values.min_caption_words}
    if values.dataset == "synthetic":
        source["synthetic_dir"] = os.path.abspath(values.synthetic_dir)
    elif values.dataset == "conceptual":
        source["cc_image_names"] = values.cc_image_names
    return source
