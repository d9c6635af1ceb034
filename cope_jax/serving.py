"""Serving artifacts: each domain's embedding function, compiled-ready via `jax.export`.

  serving.export_embedders(config, model_params, "serving/")        # with the model code
  embed_video = serving_artifact.load_embedder("serving/", "video")  # without it
  embed_video({"video_frames": frames})  # -> {"video_embedding": [B, D] float32}

From the command line (the model of WORKDIR's latest checkpoint, or of
`config.train.init_from`, with the config's shapes):

  python -m cope_jax.serving --config C --workdir DIR --out SERVING_DIR

The output directory's layout is documented once, in `cope_jax.serving_artifact` (the
format's reader).

Design: the parameters are an argument of the exported function, not constants folded
into it, so the artifacts depend only on the architecture (config.model and the input
sizes): weights retrained with the same config are served by replacing params.npz.
The batch dimension is symbolic ('b') unless `batch_size` is given, so one artifact
serves any batch size. Inputs are those of the eval batches (docs/interfaces.md): uint8
images, int32 token ids and masks padded to the configured length.

The format and the loader are `cope_jax.serving_artifact`, which needs only JAX, NumPy and
the base layer (never `cope_jax.models`); this module writes artifacts with the model code.
Serialising and deserialising need the `flatbuffers` package. An artifact runs on the platforms it was
exported for (`platforms`, default: the exporting backend) with a JAX at least as new
as the exporting one (jax.export's compatibility guarantees).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
import flax.linen as nn
import jax
from jax import export as jax_export
import numpy as np

from cope_jax import cli
from cope_jax import config_checks
from cope_jax import run_record
from cope_jax import serving_artifact
from cope_jax import sharding
from cope_jax import state
from cope_jax import workdir_lock
from cope_jax.base import domains as domain_registry
from cope_jax.base import result_files
from cope_jax.serving_artifact import BATCH_DIM, FORMAT_VERSION, MANIFEST, PARAMS_FILE
from cope_jax.serving_artifact import VOCAB_FILE, ServingError


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
  if batch_size is not None and batch_size <= 0:
    raise ServingError(f"batch_size must be positive or None, got {batch_size}")
  model = state.build_model(config)
  params = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(dict(model_params))))
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  (batch,) = (jax_export.symbolic_shape(BATCH_DIM) if batch_size is None else (batch_size,))
  serialized: dict[str, bytearray] = {}
  batch_name = BATCH_DIM if batch_size is None else batch_size

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
    inputs = serving_artifact.domain_inputs(config, domain)
    abstract_inputs = {name: jax.ShapeDtypeStruct((batch,) + shape, dtype)
                       for name, (shape, dtype) in inputs.items()}

    def embed(params, inputs, domain=domain):
      return model.apply({"params": params}, inputs, domain,
                         outputs=serving_artifact.domain_outputs(config, domain), method=type(model).embed)

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
        np.savez(f, **{path: serving_artifact.storable(value) for path, value in serving_artifact.flatten(params).items()})
    if has_vocab:
      with open(vocab_path, "rb") as f:
        result_files.write_bytes(os.path.join(staging, VOCAB_FILE), f.read())
    # Shapes and names only: no NaN.
    result_files.write_text(os.path.join(staging, MANIFEST),
                            json.dumps(manifest, indent=2, allow_nan=False) + "\n")
  return manifest


def _define_flags(flag_values) -> None:
  flags.DEFINE_string("out", None, "output folder of the serving artifacts",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", None, "a fixed batch size (default: any, symbolic)",
                       flag_values=flag_values)
  flags.DEFINE_list("platforms", [], "platforms to export for, e.g. cpu,cuda (default: "
                    "this machine's backend)", flag_values=flag_values)
  flags.DEFINE_list("domains", list(domain_registry.NAMES), "the domains to export",
                    flag_values=flag_values)


def _job(args) -> None:
  for domain in args.domains:
    serving_artifact.registered_domain(domain)
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
  command = cli.command("python -m cope_jax.serving", __doc__,
                        workdir_help="training directory whose model is exported (its "
                                     "latest checkpoint, or config.train.init_from)",
                        define_flags=_define_flags, required=("out",))
  cli.run_job(command, _job, argv)


if __name__ == "__main__":
  main()
