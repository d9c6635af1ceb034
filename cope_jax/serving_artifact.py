"""The serving artifact's format and its loader: each domain's embedding function
(`jax.export`) and the parameters, run without the model code.

  embed_video = serving_artifact.load_embedder("serving/", "video")
  embed_video({"video_frames": frames})  # -> {"video_embedding": [B, D] float32}

`cope_jax.serving` writes the artifact (it needs the model code); this module reads it
and needs only JAX, NumPy and the base layer, never `cope_jax.models` (the Beam
embedding job's workers load artifacts through it). Layout of an artifact folder:

  <domain>.jax_exported    `jax.export.Exported.serialize()` of
                           `fn(params, inputs) -> {name: [B, D] float32}`, the
                           `COPE.embed(..., domain)` computation, for each domain
  params.npz               the model parameters, flattened with '/'-joined keys
  vocab.txt                the WordPiece vocabulary the text inputs are tokenised with
                           (a copy of config.data.vocab_path, when that file exists)
  serving_manifest.json    per domain: the artifact, its inputs (name, shape, dtype; 'b' is
                           the batch dimension) and outputs; embedding_dim, batch_size,
                           platforms, config_hash, the config itself (the input sizes and
                           eval settings a batch job over the artifact needs, e.g.
                           `cope_jax.embed_beam`), the vocabulary file and its sha256,
                           the JAX version that exported it, and where the parameters
                           come from (`provenance`)

Inputs are those of the eval batches (docs/interfaces.md): uint8 images, int32 token ids
and masks padded to the configured length. Deserialising needs the `flatbuffers` package.
An artifact runs on the platforms it was exported for with a JAX at least as new as the
exporting one (jax.export's compatibility guarantees).
"""


from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
from jax import export as jax_export
import numpy as np

from cope_jax.base import domains as domain_registry

MANIFEST = "serving_manifest.json"
PARAMS_FILE = "params.npz"
VOCAB_FILE = "vocab.txt"
BATCH_DIM = "b"
FORMAT_VERSION = 1


class ServingError(ValueError):
  """A serving directory or an input batch does not fit the exported functions."""


def registered_domain(name: str) -> domain_registry.Domain:
  if name not in domain_registry.BY_NAME:
    raise ServingError(f"unknown domain {name!r}: expected one of {domain_registry.NAMES}")
  return domain_registry.BY_NAME[name]


def domain_inputs(config, domain: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{input name: (shape without the batch dimension, dtype name)} of one domain.

  The pixels: `page_image` [S, S, 3] or `<clip domain>_frames` [T, S, S, 3], uint8; and,
  where the domain's embedding fuses text (pages; clips with `config.model.use_asr_text`),
  its token ids and mask [L] int32 (`page_title_ids`, `video_asr_ids`, ...).
  """
  spec = registered_domain(domain)
  side = config.data.image_size
  pixels = (config.data.num_frames, side, side, 3) if spec.is_clip else (side, side, 3)
  inputs = {spec.media_key: (pixels, "uint8")}
  if spec.fuses_text(config.model.use_asr_text):
    length = config.data[spec.text_length_field]
    inputs[spec.text_ids_key] = ((length,), "int32")
    inputs[spec.text_mask_key] = ((length,), "int32")
  return inputs


def domain_outputs(config, domain: str) -> tuple[str, ...]:
  """The embeddings exported for a domain: all three where its inputs include text
  (retrieval, text and visual embedding), else the retrieval embedding."""
  spec = registered_domain(domain)
  if spec.fuses_text(config.model.use_asr_text):
    return (spec.embedding_key, spec.text_embedding_key, spec.visual_embedding_key)
  return (spec.embedding_key,)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{path}/"))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def storable(array: np.ndarray) -> np.ndarray:
  """NumPy's .npz cannot describe bfloat16 & co.: those are stored as raw unsigned ints."""
  if array.dtype.kind in "biuf" and array.dtype.name in np.sctypeDict:
    return array
  return array.view(f"u{array.dtype.itemsize}")


def read_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ServingError(f"{out_dir}: no {MANIFEST} (write it with "
                       "python -m cope_jax.serving)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ServingError(f"{path}: format_version {manifest.get('format_version')}, this code "
                       f"reads {FORMAT_VERSION}")
  return manifest


def _load_params(path: str, exported: jax_export.Exported) -> Any:
  """params.npz as the pytree the exported function takes, in its dtypes."""
  if not os.path.isfile(path):
    raise ServingError(f"{path}: parameter file missing")
  with np.load(path) as stored:
    flat = {key: stored[key] for key in stored.files}
  params = _unflatten(flat)
  want = jax.tree.unflatten(exported.in_tree, exported.in_avals)[0][0]
  leaves, tree = jax.tree.flatten(params)
  want_leaves, want_tree = jax.tree.flatten(want)
  if tree != want_tree:
    raise ServingError(f"{path}: its parameters do not have the structure the exported "
                       "function takes (re-export, or use the params.npz written with it)")
  restored = []
  for value, aval in zip(leaves, want_leaves):
    if value.dtype != aval.dtype:
      value = value.view(aval.dtype)
    if value.shape != aval.shape:
      raise ServingError(f"{path}: a parameter has shape {value.shape}, the exported "
                         f"function takes {aval.shape}")
    restored.append(value)
  return jax.tree.unflatten(tree, restored)


def load_embedder(out_dir: str, domain: str, params: Any = None
                  ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
  """The exported embedding of `domain` as `inputs dict -> {name: [B, D] float32 numpy}`.

  Args:
    out_dir: a directory written by `export_embedders`.
    domain: a domain name (`cope_jax.base.domains.NAMES`).
    params: parameters to use instead of `out_dir/params.npz` (same structure).

  The returned function checks input names and shapes against the manifest and casts
  integer inputs of another width (e.g. int64 token ids) to the exported dtype.
  """
  return load_embedders(out_dir, (domain,), params)[domain]


def load_embedders(out_dir: str, domains: Sequence[str] | None = None, params: Any = None
                   ) -> dict[str, Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]]:
  """`load_embedder` of several domains (default: every exported one), reading and
  placing the parameters once for all of them."""
  manifest = read_manifest(out_dir)
  domains = list(manifest["domains"]) if domains is None else list(domains)
  for domain in domains:
    if domain not in manifest["domains"]:
      raise ServingError(f"{out_dir}: no exported domain {domain!r} "
                         f"(have {sorted(manifest['domains'])})")
  exported = {}
  for domain in domains:
    with open(os.path.join(out_dir, manifest["domains"][domain]["file"]), "rb") as f:
      exported[domain] = jax_export.deserialize(bytearray(f.read()))
  if params is None and domains:  # every domain's function takes the same parameters
    params = _load_params(os.path.join(out_dir, manifest["params_file"]),
                          exported[domains[0]])
  device_params = jax.device_put(params)
  return {domain: _embedder(domain, manifest["domains"][domain]["inputs"], exported[domain],
                            device_params) for domain in domains}


def _embedder(domain: str, specs: Mapping[str, Any], exported: jax_export.Exported,
              device_params: Any):
  call = jax.jit(exported.call)

  def embed(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = sorted(set(specs) - set(inputs))
    if missing:
      raise ServingError(f"{domain} inputs lack {missing} (needs {sorted(specs)})")
    arrays, batch = {}, None
    for name, spec in specs.items():
      value = np.asarray(inputs[name])
      if value.ndim != len(spec["shape"]) or any(
          isinstance(want, int) and got != want
          for got, want in zip(value.shape, spec["shape"])):
        raise ServingError(f"{domain} input {name!r}: shape {value.shape}, exported for "
                           f"{spec['shape']}")
      if batch not in (None, value.shape[0]):
        raise ServingError(f"{domain} inputs disagree on the batch size")
      batch = value.shape[0]
      if value.dtype != spec["dtype"]:
        if not np.can_cast(value.dtype, spec["dtype"], casting="same_kind"):
          raise ServingError(f"{domain} input {name!r}: dtype {value.dtype}, exported for "
                             f"{spec['dtype']}")
        value = value.astype(spec["dtype"])
      arrays[name] = value
    return {name: np.asarray(value) for name, value in call(device_params, arrays).items()}

  return embed


# ----------------------------------------------------------------------------
# Command line.


