"""examples.html of the evaluation report: example queries of every direction with their
top-k results as inline thumbnails (a self-contained page; `cope_jax.report` writes it)."""

from __future__ import annotations

from PIL import Image
import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from cope_jax import embed
from cope_jax.search import exact
from cope_jax.base import domains

EXAMPLES_SEED = 0
EXAMPLES_TOP_K = 5
THUMBNAIL_SIDE = 112  # pixels, longest side
THUMBNAIL_QUALITY = 85  # JPEG quality of the embedded thumbnails


def thumbnail_data_uri(jpeg_bytes: bytes, side: int = THUMBNAIL_SIDE) -> str:
  """A `data:image/jpeg;base64,...` URI of the image shrunk to `side` pixels."""

  with Image.open(io.BytesIO(jpeg_bytes)) as image:
    image = image.convert("RGB")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def record_image(record: Mapping[str, Any]) -> bytes:
  """The JPEG bytes that show a record: the page image or a clip's middle frame."""
  if "image" in record:
    return record["image"]
  frames = record.get("frames") or []
  if not frames:
    raise ValueError(f"record {record.get('id')!r} has no image and no frames")
  return frames[len(frames) // 2]


class RecordImages:
  """Looks up the thumbnail of a record of one domain by its id.

  Embedding row i is normally record i of the prepared source (the eval pipeline
  keeps record order); when it is not, the records of the item's product (from the
  products table) are searched. Only the records asked for are read.
  """

  def __init__(self, source, products: Sequence[Mapping[str, Any]], domain: str):
    self._source = source
    self._domain = domain
    self._products = {p["product_id"]: p for p in products}
    self._cache: dict[str, str] = {}

  def data_uri(self, row: int, item_id: str, product_id: str) -> str:
    if item_id not in self._cache:
      self._cache[item_id] = thumbnail_data_uri(record_image(self._find(row, item_id, product_id)))
    return self._cache[item_id]

  def _find(self, row: int, item_id: str, product_id: str) -> Mapping[str, Any]:
    if 0 <= row < len(self._source):
      record = self._source[row]
      if record["id"] == item_id:
        return record
    for index in self._products.get(product_id, {}).get(self._domain, []):
      record = self._source[index]
      if record["id"] == item_id:
        return record
    raise KeyError(f"{self._domain} record {item_id!r} (product {product_id!r}) not found "
                   "in the prepared records")


def select_examples(num_queries: int, num_examples: int, seed: int) -> np.ndarray:
  """Sorted indices of `num_examples` distinct queries drawn with `seed`."""
  count = min(num_examples, num_queries)
  return np.sort(np.random.default_rng(seed).choice(num_queries, size=count, replace=False))


def _image_cell(uri: str | None, lines: Sequence[str], correct: bool | None) -> str:
  """One table cell: thumbnail, ✓ when correct, caption lines (plain text)."""
  css = {True: "correct", False: "wrong", None: "query"}[correct]
  mark = '<span class="mark">✓</span>' if correct else ""
  alt = html.escape(lines[0], quote=True)
  image = f'<img src="{uri}" alt="{alt}">' if uri else '<div class="noimage">no image</div>'
  caption = "<br>".join(html.escape(line) for line in lines)
  return f'<td class="{css}">{image}{mark}<div class="caption">{caption}</div></td>'


def examples_html(embeddings: Mapping[str, embed.DomainEmbeddings],
                  images: Mapping[str, RecordImages], num_examples: int,
                  title: str = "COPE retrieval examples", seed: int = EXAMPLES_SEED,
                  top_k: int = EXAMPLES_TOP_K) -> str:
  """A self-contained HTML page: per direction, example queries and their top-k.

  The same seeded query sample is drawn in every run. A retrieved item showing the
  query's product gets a green border and a ✓. Thumbnails are inline base64 JPEG.
  """
  sections = []
  for direction_index, (name, query_domain, gallery_domain) in enumerate(
      (domains.direction_name(q, g), q, g) for q, g in domains.DIRECTIONS):
    if query_domain not in embeddings or gallery_domain not in embeddings:
      continue
    query, gallery = embeddings[query_domain], embeddings[gallery_domain]
    if len(query) == 0 or len(gallery) == 0:
      continue
    chosen = select_examples(len(query), num_examples, seed + direction_index)
    k = min(top_k, len(gallery))
    scores, indices = exact.exact_search(query.embeddings[chosen], gallery.embeddings, k)
    rows = []
    for query_row, row_scores, row_indices in zip(chosen, scores, indices):
      query_product = str(query.product_ids[query_row])
      cells = [_image_cell(
          _try_uri(images[query_domain], query_row, query),
          [f"query {query.ids[query_row]}", f"product {query_product}"], None)]
      for rank, (score, gallery_row) in enumerate(zip(row_scores, row_indices), start=1):
        result_product = str(gallery.product_ids[gallery_row])
        cells.append(_image_cell(
            _try_uri(images[gallery_domain], gallery_row, gallery),
            [f"#{rank} {gallery.ids[gallery_row]}", f"product {result_product}",
             f"score {float(score):.3f}"],
            result_product == query_product))
      rows.append("<tr>" + "".join(cells) + "</tr>")
    sections.append(
        f"<h2>{html.escape(domains.direction_label(query_domain, gallery_domain))}</h2>\n"
        f"<table>\n" + "\n".join(rows) + "\n</table>")
  return _HTML_PAGE.format(title=html.escape(title), body="\n".join(sections))


def _try_uri(images: RecordImages, row: int, domain_embeddings: embed.DomainEmbeddings
             ) -> str | None:
  try:
    return images.data_uri(int(row), str(domain_embeddings.ids[row]),
                           str(domain_embeddings.product_ids[row]))
  except (KeyError, ValueError, OSError) as error:
    logging.warning("report: no thumbnail for %s %s: %s", domain_embeddings.domain,
                    domain_embeddings.ids[row], error)
    return None


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: separate; border-spacing: 6px; margin-bottom: 1.5em; }}
td {{ vertical-align: top; text-align: center; font-size: 11px; width: 124px;
      border: 4px solid #ddd; padding: 2px; position: relative; }}
td.query {{ border-color: #3465a4; }}
td.correct {{ border-color: #2e9e2e; }}
td.wrong {{ border-color: #ddd; }}
.mark {{ position: absolute; top: 2px; right: 6px; color: #2e9e2e; font-size: 20px;
         font-weight: bold; }}
.noimage {{ width: 112px; height: 112px; line-height: 112px; background: #eee; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Each row: the query (blue) and its top results by cosine similarity. Results showing
the query's product have a green border and a ✓.</p>
{body}
</body></html>
"""
