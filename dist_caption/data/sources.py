"""One entry to every data source: the dataset flags -> caption records."""

from __future__ import annotations

import logging
import os

from dist_caption.data.records import SPLITS, CaptionRecord, LoadReport


def synthetic_records(synthetic_dir: str, num_images: int, seed: int, image_size: int,
                      report: LoadReport) -> list[CaptionRecord]:
    """The synthetic dataset's records, generating it first if `synthetic_dir` is not complete."""
    from dist_caption.data import coco, synthetic

    if not synthetic.is_complete(synthetic_dir):
        logging.info("generating the synthetic dataset in %s", synthetic_dir)
        synthetic.generate(synthetic_dir, num_images, seed, image_size)
    files = [f"{split}={os.path.join(synthetic_dir, 'annotations', f'captions_{split}.json')}"
             for split in SPLITS]
    return coco.load_coco(files, os.path.join(synthetic_dir, "images"), report)


def load_records(values) -> tuple[list[CaptionRecord], LoadReport]:
    """Records of the dataset the flags (`define_dataset_flags`) name, and what was dropped."""
    from dist_caption.data import coco, flickr8k

    report = LoadReport()
    if values.dataset == "synthetic":
        records = synthetic_records(values.synthetic_dir, values.num_images,
                                    values.synthetic_seed, values.image_size, report)
    elif values.dataset == "coco":
        records = coco.load_coco(values.captions_json, values.image_dir, report)
    elif values.dataset == "karpathy":
        records = coco.load_karpathy(values.karpathy_json, values.image_dir, report)
    else:
        records = flickr8k.load_flickr8k(values.flickr8k_captions, values.image_dir,
                                         values.flickr8k_splits_dir, report)
    logging.info("%s: %d images (%s); %s", values.dataset, len(records),
                 ", ".join(f"{s} {sum(r.split == s for r in records)}" for s in SPLITS),
                 report.summary())
    return records, report
