"""Prints each served caption beside the image's reference captions (the quickstart's last step).

    python launch/served_vs_references.py test-images DATA_DIR N       # N test image paths
    python launch/served_vs_references.py compare DATA_DIR served.jsonl  # after serving.client --json

DATA_DIR is a dataset in COCO layout (annotations/captions_test.json, images/), such as the
synthetic one.
"""

from __future__ import annotations

import json
import os
import sys


def test_split(data_dir: str) -> tuple[dict[str, int], dict[int, list[str]]]:
    with open(os.path.join(data_dir, "annotations", "captions_test.json"), encoding="utf-8") as f:
        coco = json.load(f)
    paths = {os.path.join(data_dir, "images", i["file_name"]): i["id"] for i in coco["images"]}
    references: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    return paths, references


def main(argv: list[str]) -> None:
    command, data_dir, arg = argv[1:4]
    paths, references = test_split(data_dir)
    if command == "test-images":
        print("\n".join(sorted(paths)[:int(arg)]))
        return
    with open(arg, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            print(f"{os.path.basename(row['image'])}\n  served:     {row['caption']}")
            for ref in references[paths[row["image"]]]:
                print(f"  reference:  {ref}")


if __name__ == "__main__":
    main(sys.argv)
