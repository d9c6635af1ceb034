"""Incremental exports (`--since EARLIER`): which catalog rows to embed, which to carry over.

An export records per row a digest of the item's inputs (`content_digest`:
`data_pipelines.eval_inputs.content_digest` of its product id, text and the frames the
model reads). A later export of the same model over the catalog as it is now

  * embeds the items whose id the earlier export lacks (added) or whose digest differs
    (changed),
  * carries every other row over from the earlier export, bit for bit (carried),
  * leaves out the earlier export's items the catalog no longer has (removed),

and writes a complete export in the catalog's order: the same files a full export of
the catalog writes, with the carried rows' bytes those of the earlier export. The
earlier export must come from the same model, split and digest definition
(`export_format.Manifest.check_since` names the first field that differs); its folder
is only read, so it may be the folder the new export replaces.

Used by both writers of the export format, `cope_jax.export` and `cope_jax.embed_beam`.
NumPy and the export format only: no JAX, no model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cope_jax import export_format

COUNTS = ("added", "changed", "carried", "removed")  # a domain's lineage counts


@dataclasses.dataclass(frozen=True)
class DomainPlan:
  """What an export does with each catalog row of one domain.

  embed: [E] int64 positions (in catalog order) of the rows to embed;
  carry: [C] positions of the rows carried over, carry_from: [C] their rows in the
  earlier export; counts: added, changed, carried, removed.
  """
  domain: str
  embed: np.ndarray
  carry: np.ndarray
  carry_from: np.ndarray
  counts: dict[str, int]


def full_plan(domain: str, num_rows: int) -> DomainPlan:
  """Every row embedded: an export made in full."""
  nothing = np.zeros((0,), np.int64)
  return DomainPlan(domain, np.arange(num_rows, dtype=np.int64), nothing, nothing.copy(),
                    {"added": num_rows, "changed": 0, "carried": 0, "removed": 0})


@dataclasses.dataclass
class EarlierExport:
  """An export read for `--since`: its folder, manifest, and the sha256 of the manifest
  file (named in the new export's lineage)."""
  folder: str
  manifest: export_format.Manifest
  manifest_sha256: str

  @classmethod
  def open(cls, folder: str, new_manifest: export_format.Manifest) -> EarlierExport:
    """Reads the export in `folder` and checks it against `new_manifest` (the fields
    known so far; `check` again once the checkpoint is known).

    Raises:
      FileNotFoundError: `folder` holds no export manifest.
      ValueError: the manifest is not one this code reads (names the file).
      export_format.ExportMismatchError: another model, split or digest (names it).
    """
    path = os.path.join(folder, export_format.MANIFEST_FILE)
    manifest = export_format.Manifest.read(folder)
    if manifest is None:
      raise FileNotFoundError(f"--since {folder}: no export there ({path} is missing)")
    with open(path, "rb") as f:
      manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
    earlier = cls(os.path.abspath(folder), manifest, manifest_sha256)
    earlier.check(new_manifest)
    return earlier

  def check(self, new_manifest: export_format.Manifest) -> None:
    self.manifest.check_since(new_manifest, self.folder)

  def rows(self, domain: str) -> export_format.ExportRows:
    """The earlier export's rows of `domain` (none when it has no such domain), each id
    once (ExportFormatError naming the folder otherwise)."""
    entry = self.manifest.domains.get(domain)
    if entry is None:
      return export_format.empty_rows(domain, self.manifest.embedding_dim)
    rows = export_format.read_rows([os.path.join(self.folder, f["file"]) for f in entry.files],
                                   domain)
    if len(rows) != entry.count:
      raise export_format.ExportFormatError(
          f"{self.folder}: its manifest lists {entry.count} {domain} rows but its Parquet "
          f"files hold {len(rows)}")
    unique, counts = np.unique(rows.ids.astype(str), return_counts=True)
    if (counts > 1).any():
      raise export_format.ExportFormatError(
          f"{self.folder}: {domain} id {unique[counts > 1][0]} appears "
          f"{int(counts[counts > 1][0])} times; --since needs each id once")
    return rows

  def plan(self, domain: str, ids: Sequence[str], digests: Sequence[str],
           rows: export_format.ExportRows | None = None) -> DomainPlan:
    """The plan for the catalog rows `ids` [N] with content digests `digests` [N] (in
    catalog order), against this export's rows of `domain` (read when not given)."""
    rows = self.rows(domain) if rows is None else rows
    earlier = {item_id: row for row, item_id in enumerate(rows.ids.tolist())}
    embed, carry, carry_from = [], [], []
    added = changed = 0
    for position, (item_id, digest) in enumerate(zip(ids, digests)):
      row = earlier.get(item_id)
      if row is None:
        added += 1
        embed.append(position)
      elif digest is None or rows.content_digests[row] != digest:
        changed += 1
        embed.append(position)
      else:
        carry.append(position)
        carry_from.append(row)
    removed = len(set(earlier) - set(ids))
    return DomainPlan(domain, np.asarray(embed, np.int64), np.asarray(carry, np.int64),
                      np.asarray(carry_from, np.int64),
                      {"added": added, "changed": changed, "carried": len(carry),
                       "removed": removed})

  def lineage(self, plans: Mapping[str, DomainPlan]) -> dict[str, Any]:
    """The new manifest's `lineage`: this export and, per domain of either export, the
    rows added, changed, carried over and removed (a domain the catalog no longer has:
    all its rows removed)."""
    counts = {domain: dict(plan.counts) for domain, plan in plans.items()}
    for domain, entry in self.manifest.domains.items():
      if domain not in counts:
        counts[domain] = {"added": 0, "changed": 0, "carried": 0, "removed": entry.count}
    return {"since": self.folder, "since_manifest_sha256": self.manifest_sha256,
            "since_writer": self.manifest.writer,
            "domains": {domain: counts[domain] for domain in sorted(counts)}}


def assemble(domain: str, ids: Sequence[str], product_ids: Sequence[str],
             digests: Sequence[str], plan: DomainPlan, embedded: np.ndarray, dim: int,
             earlier_rows: export_format.ExportRows | None) -> export_format.ExportRows:
  """The rows of the new export, in catalog order.

  Args:
    ids, product_ids, digests: [N] the catalog's rows.
    plan: `plan.embed` [E] and `plan.carry` [C] cover the N positions once each.
    embedded: [E, D] float32, the embeddings of the rows `plan.embed`, in that order.
    dim: D.
    earlier_rows: the earlier export's rows (`EarlierExport.rows`) when C > 0.
  """
  num_rows = len(ids)
  embedded = np.asarray(embedded, np.float32).reshape(-1, dim)
  if len(plan.embed) != len(embedded):
    raise ValueError(f"{domain}: {len(embedded)} embeddings for {len(plan.embed)} rows "
                     "to embed")
  if len(plan.embed) + len(plan.carry) != num_rows:
    raise ValueError(f"{domain}: the plan covers {len(plan.embed) + len(plan.carry)} of "
                     f"{num_rows} rows")
  embeddings = np.zeros((num_rows, dim), np.float32)
  embeddings[plan.embed] = embedded
  if len(plan.carry):
    carried = earlier_rows.take(plan.carry_from)
    if list(carried.ids) != [ids[i] for i in plan.carry]:
      raise ValueError(f"{domain}: the rows carried over do not match their ids")
    embeddings[plan.carry] = carried.embeddings
  return export_format.ExportRows(
      domain=domain, ids=np.asarray(list(ids), object),
      product_ids=np.asarray(list(product_ids), object),
      content_digests=np.asarray(list(digests), object), embeddings=embeddings)


def describe_lineage(manifest: export_format.Manifest) -> str:
  """One line per domain: what an incremental export embedded and carried over."""
  lineage = manifest.lineage or {}
  lines = [f"since {lineage.get('since')}:"]
  for domain, counts in (lineage.get("domains") or {}).items():
    lines.append(f"  {domain}: " + ", ".join(f"{counts[what]} {what}" for what in COUNTS))
  return "\n".join(lines)
