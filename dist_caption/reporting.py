"""A browsable HTML page of an export's captions on a dataset split, with their scores
(`build_report`); the command is `python -m dist_caption.report` (report.py).

Each image (a thumbnail embedded in the page) is shown with the export's greedy caption, the
reference captions and its own BLEU-4, METEOR, ROUGE-L and CIDEr (and, on the synthetic dataset,
whether the caption names the scene exactly); click a column header to sort by it. The metric
table of the whole split heads the page.
"""

from __future__ import annotations

import base64
import html
import io


from dist_caption.data import synthetic
from dist_caption.errors import UserError
from dist_caption.metrics import caption_scores
from dist_caption.prediction import LoadedExport

THUMBNAIL = 128

_SCRIPT = """
function sortBy(col) {
  const body = document.querySelector('#captions tbody');
  const rows = Array.from(body.rows);
  const down = body.dataset.col == col && body.dataset.dir != 'down';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    const c = isNaN(x) ? x.localeCompare(y) : x - y;
    return down ? -c : c;
  });
  body.dataset.col = col; body.dataset.dir = down ? 'down' : 'up';
  rows.forEach(r => body.appendChild(r));
}
"""
_STYLE = """
body { font-family: sans-serif; margin: 2em; } table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
#captions th { cursor: pointer; background: #eee; } .refs { color: #555; font-size: 90%; }
.miss { color: #b00; } .hit { color: #070; }
"""


def thumbnail(path: str) -> str:
    """A small JPEG of the image as a data: URI."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def render(title: str, metrics: dict, rows: list[dict], columns: list[str]) -> str:
    """The page: metric table, then one sortable row per image."""
    metric_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.3f}</td></tr>"
                          for k, v in metrics.items())
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(c)}</th>"
                   for i, c in enumerate(["image", "caption", *columns]))
    body = []
    for row in rows:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
        cells = [f"<td data-v='{html.escape(row['image_id'])}'><img src='{row['thumbnail']}' "
                 f"alt='{html.escape(row['image_id'])}'><br>{html.escape(row['image_id'])}</td>",
                 f"<td data-v='{html.escape(row['caption'])}'><b>{html.escape(row['caption'])}"
                 f"</b><ul class='refs'>{refs}</ul></td>"]
        for column in columns:
            value = row["scores"][column]
            if isinstance(value, bool):
                cells.append(f"<td data-v='{int(value)}' class='{'hit' if value else 'miss'}'>"
                             f"{'yes' if value else 'no'}</td>")
            else:
                cells.append(f"<td data-v='{value:.6f}'>{value:.3f}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><table>{metric_rows}</table>"
            f"<p>{len(rows)} images; click a column header to sort.</p>"
            f"<table id='captions'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            f"</tbody></table></body></html>")


def build_report(saved_model: str, records, split: str, synthetic_dir: str | None = None
                 ) -> tuple[str, dict]:
    """(HTML page, corpus metrics) of the export's captions of `records` in `split`."""
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise UserError(f"the dataset has no {split} images: choose another --split")
    captioner = LoadedExport(saved_model)
    results = captioner.caption([r.image_path for r in chosen])
    predictions = {r.image_id: res["caption"] for r, res in zip(chosen, results)}
    references = {r.image_id: list(r.captions) for r in chosen}
    metrics, per_image = caption_scores(predictions, references)
    columns = list(next(iter(per_image.values())))
    if synthetic_dir:
        scenes = synthetic.load_scenes(synthetic_dir)
        for image_id, caption in predictions.items():
            per_image[image_id]["scene"] = synthetic.caption_matches_scene(
                caption, scenes[image_id])
        metrics["scene_accuracy"] = synthetic.scene_accuracy(predictions, scenes)
        columns.append("scene")
    rows = [{"image_id": r.image_id, "thumbnail": thumbnail(r.image_path),
             "caption": predictions[r.image_id], "references": references[r.image_id],
             "scores": per_image[r.image_id]} for r in chosen]
    title = f"{captioner.path}: {split} split, {len(rows)} images"
    return render(title, metrics, rows, columns), metrics
