"""Serving artifacts: each domain's embedding function, compiled-ready via `jax.export`.

  serving.export_embedders(config, model_params, "serving/")        # with the model code
  embed_video = serving.load_embedder("serving/", "video")           # without it
  embed_video({"video_frames": frames})  # -> {"video_embedding": [B, D] float32}

From the command line (the model of WORKDIR's latest checkpoint, or of
`config.train.init_from`, with the config's shapes):

  python -m cope_jax.serving --config C --workdir DIR --out SERVING_DIR

Layout of the output directory:

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
                           the JAX version that exported it

Design: the parameters are an argument of the exported function, not constants folded
into it, so the artifacts depend only on the architecture (config.model and the input
sizes): weights retrained with the same config are served by replacing params.npz.
The batch dimension is symbolic ('b') unless `batch_size` is given, so one artifact
serves any batch size. Inputs are those of the eval batches (docs/interfaces.md): uint8
images, int32 token ids and masks padded to the configured length.

Loading needs only JAX, NumPy and this module (never `cope_jax.models`); serialising and
deserialising need the `flatbuffers` package. An artifact runs on the platforms it was
exported for (`platforms`, default: the exporting backend) with a JAX at least as new
as the exporting one (jax.export's compatibility guarantees).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
from jax import export as jax_export
import numpy as np

from data_pipelines import domains as domain_registry

MANIFEST = "serving_manifest.json"
PARAMS_FILE = "params.npz"
VOCAB_FILE = "vocab.txt"
BATCH_DIM = "b"
FORMAT_VERSION = 1


class ServingError(ValueError):
  """A serving directory or an input batch does not fit the exported functions."""


def _domain(name: str) -> domain_registry.Domain:
  if name not in domain_registry.BY_NAME:
    raise ServingError(f"unknown domain {name!r}: expected one of {domain_registry.NAMES}")
  return domain_registry.BY_NAME[name]


def domain_inputs(config, domain: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{input name: (shape without the batch dimension, dtype name)} of one domain.

  The pixels: `page_image` [S, S, 3] or `<clip domain>_frames` [T, S, S, 3], uint8; and,
  where the domain's embedding fuses text (pages; clips with `config.model.use_asr_text`),
  its token ids and mask [L] int32 (`page_title_ids`, `video_asr_ids`, ...).
  """
  spec = _domain(domain)
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
  spec = _domain(domain)
  if spec.fuses_text(config.model.use_asr_text):
    return (spec.embedding_key, spec.text_embedding_key, spec.visual_embedding_key)
  return (spec.embedding_key,)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{path}/"))
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


def _storable(array: np.ndarray) -> np.ndarray:
  """NumPy's .npz cannot describe bfloat16 & co.: those are stored as raw unsigned ints."""
  if array.dtype.kind in "biuf" and array.dtype.name in np.sctypeDict:
    return array
  return array.view(f"u{array.dtype.itemsize}")


def export_embedders(config, model_params: Mapping[str, Any], out_dir: str,
                     batch_size: int | None = None,
                     platforms: Sequence[str] | None = None,
                     domains: Sequence[str] = domain_registry.NAMES,
                     provenance: dict | None = None) -> dict:
  """Exports `COPE.embed` of each domain of `COPE(config.model)` to `out_dir`.

  Args:
    config: the run config (`config.model` and the input sizes of `config.data`).
    model_params: the COPE parameters (`variables['params']`; boxed or not), addressable
      on this host.
    out_dir: created if needed; existing artifacts are overwritten.
    batch_size: a fixed batch size, or None for a symbolic one.
    platforms: e.g. ("cpu", "cuda"); None exports for the current backend only.
    domains: the domains to export (all by default).
    provenance: where the parameters come from (`run_record.provenance`: checkpoint
      step, config digest, prepared data, code), recorded in the manifest.

  Returns:
    The manifest written to `out_dir/serving_manifest.json`.
  """
  # The model code is needed to export, never to load.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from cope_jax import config_checks  # pylint: disable=g-import-not-at-top
  from cope_jax import state  # pylint: disable=g-import-not-at-top

  if batch_size is not None and batch_size <= 0:
    raise ServingError(f"batch_size must be positive or None, got {batch_size}")
  model = state.build_model(config)
  params = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(dict(model_params))))
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  (batch,) = (jax_export.symbolic_shape(BATCH_DIM) if batch_size is None else (batch_size,))
  serialized: dict[str, bytearray] = {}
  batch_name = BATCH_DIM if batch_size is None else batch_size

  from cope_jax import result_files  # pylint: disable=g-import-not-at-top

  vocab_path = config.data.get("vocab_path", "")
  has_vocab = bool(vocab_path) and os.path.isfile(vocab_path)
  vocabulary = None
  if has_vocab:
    with open(vocab_path, "rb") as f:
      vocabulary = {"file": VOCAB_FILE, "sha256": hashlib.sha256(f.read()).hexdigest()}
  manifest = {"format_version": FORMAT_VERSION, "params_file": PARAMS_FILE,
              "batch_size": batch_size, "embedding_dim": int(config.model.emb_dim),
              "config_hash": config_checks.config_hash(config),
              "model_config_hash": config_checks.config_hash(config.model),
              "config": json.loads(config.to_json(sort_keys=True)),
              "vocabulary": vocabulary,
              "jax_version": jax.__version__, "provenance": provenance, "domains": {}}
  for domain in domains:
    inputs = domain_inputs(config, domain)
    abstract_inputs = {name: jax.ShapeDtypeStruct((batch,) + shape, dtype)
                       for name, (shape, dtype) in inputs.items()}

    def embed(params, inputs, domain=domain):
      return model.apply({"params": params}, inputs, domain,
                         outputs=domain_outputs(config, domain), method=type(model).embed)

    exported = jax_export.export(jax.jit(embed), platforms=platforms)(
        abstract_params, abstract_inputs)
    file_name = f"{domain}.jax_exported"
    serialized[file_name] = exported.serialize()
    outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    manifest["domains"][domain] = {
        "file": file_name,
        "inputs": {name: {"shape": [batch_name, *shape], "dtype": dtype}
                   for name, (shape, dtype) in inputs.items()},
        "outputs": {name: {"shape": [batch_name, int(aval.shape[-1])],
                           "dtype": str(aval.dtype)} for name, aval in outputs.items()},
    }
    manifest["platforms"] = list(exported.platforms)

  # Written as a whole: the files go into a staging folder and replace those of
  # out_dir (other files there are kept) once all are written, the manifest last.
  with result_files.staged_directory(out_dir, last=(MANIFEST,)) as staging:
    for file_name, data in serialized.items():
      result_files.write_bytes(os.path.join(staging, file_name), data)
    with result_files.staged_file(os.path.join(staging, PARAMS_FILE)) as temporary:
      with open(temporary, "wb") as f:
        np.savez(f, **{path: _storable(value) for path, value in _flatten(params).items()})
    if has_vocab:
      with open(vocab_path, "rb") as f:
        result_files.write_bytes(os.path.join(staging, VOCAB_FILE), f.read())
    # Shapes and names only: no NaN.
    result_files.write_text(os.path.join(staging, MANIFEST),
                            json.dumps(manifest, indent=2, allow_nan=False) + "\n")
  return manifest


def read_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ServingError(f"{out_dir}: no {MANIFEST} (write it with "
                       "cope_jax.serving.export_embedders)")
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
    domain: a domain name (`data_pipelines.domains.NAMES`).
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


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("out", None, "output folder of the serving artifacts",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", None, "a fixed batch size (default: any, symbolic)",
                       flag_values=flag_values)
  flags.DEFINE_list("platforms", [], "platforms to export for, e.g. cpu,cuda (default: "
                    "this machine's backend)", flag_values=flag_values)
  flags.DEFINE_list("domains", list(domain_registry.NAMES), "the domains to export",
                    flag_values=flag_values)


def _job(args) -> None:
  from cope_jax import cli  # pylint: disable=g-import-not-at-top
  from cope_jax import config_checks  # pylint: disable=g-import-not-at-top
  from cope_jax import run_record  # pylint: disable=g-import-not-at-top
  from cope_jax import sharding  # pylint: disable=g-import-not-at-top
  from cope_jax import state  # pylint: disable=g-import-not-at-top
  from cope_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  for domain in args.domains:
    _domain(domain)
  config_checks.check_config(args.config)
  # The run's config (or this one, checked against it); serving reads no data.
  config = run_record.begin_job(args.config, args.workdir, "serving", check_data=False,
                                writer=jax.process_index() == 0, **cli.job_options(args))
  mesh = sharding.make_mesh(config.mesh)
  params, step, source = state.load_model_params(config, args.workdir, mesh)
  out = os.path.abspath(args.out)
  inside = out.startswith(os.path.abspath(args.workdir) + os.sep)
  with workdir_lock.hold(args.workdir, "serving", enabled=inside and jax.process_index() == 0):
    if jax.process_index() == 0:
      manifest = export_embedders(config, params, out, batch_size=args.batch_size,
                                  platforms=args.platforms or None, domains=args.domains,
                                  provenance=run_record.provenance(config, step, source))
      print(f"wrote the serving artifacts of {', '.join(manifest['domains'])} (step {step} "
            f"of {source}) to {out}")


def main(argv=None) -> None:
  from cope_jax import cli  # pylint: disable=g-import-not-at-top

  command = cli.command("python -m cope_jax.serving", __doc__,
                        workdir_help="training directory whose model is exported (its "
                                     "latest checkpoint, or config.train.init_from)",
                        define_flags=_define_flags, required=("out",))
  cli.run_job(command, _job, argv)


if __name__ == "__main__":
  main()
