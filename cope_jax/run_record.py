"""A training run's description, kept in its folder, and how later jobs hold to it.

  WORKDIR/run.json     written by `train` when the run starts (process 0):
    config             the resolved config, every field (strict JSON): references
                       resolved, model.text.vocab_size read from the vocabulary, paths
                       absolute, data.prepared_config set to the prepared config read
    config_digest      sha256 of that config (`config_checks.config_hash`)
    prepared_data      the prepared dataset it reads (`prepare.dataset_identity`): TFDS
                       name, config, version, per-split record counts, the build's
                       fingerprint and a digest of the dataset's metadata
    vocabulary         data.vocab_path and the sha256 of the file
    init_from          config.train.init_from and the sha256 of each part's
                       conversion.json
    code               the package version and the git commit it ran from
  WORKDIR/jobs.jsonl   one line per job run on the folder (train, evaluate, export,
                       serving, report): when, where the config came from, the fields
                       it set otherwise than run.json, the config digest it ran with

Jobs after training (`evaluate`, `export`, `serving`, `report`, a resumed `train`) take
the config from run.json when they are given only `--workdir` (`recorded_config`), and
still accept `--config` and `--config.x=y` overrides. Either way `begin_job` /
`begin_training` compare what the job would run with against the record:

  - a field that changes the model or the data the checkpoint was trained on (MODEL,
    INPUT; for a resumed training also the RECIPE) is refused, naming each field with
    both values, unless the job is run with --allow_config_change;
  - evaluation fields (eval.*, evals.*), paths to the same data and how a job runs
    (mesh, workers, logging) may change;
  - the prepared data must be the one the run recorded (same config, same
    fingerprint): other data is refused, and data that is gone is refused naming what
    the run was trained on.

`provenance` is what every output (metrics.json, the export's manifest.json,
serving_manifest.json, compare.json) carries to say where it came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

import cope_jax
from cope_jax.base import workdir as workdir_layout
from cope_jax import config_checks
from cope_jax.base import result_files
from data_pipelines import prepare

RUN_FILE = workdir_layout.RUN_FILE
JOBS_FILE = workdir_layout.JOBS_FILE
RUN_FORMAT = 1
ALLOW_CHANGE_FLAG = "--allow_config_change"

# Fields that make the checkpoint what it is: its parameters and the inputs it reads.
# (prefix match: "model" covers every model field but those in HOW_FIELDS)
MODEL_FIELDS = ("model",)
INPUT_FIELDS = ("data.image_size", "data.num_frames", "data.title_max_length",
                "data.asr_max_length", "data.prepared_config")
# A resumed training also keeps the recipe that brought the checkpoint where it is.
# (train.num_steps may grow: a run is extended by resuming it with more steps. Where the
# schedule runs to the run's end, optim.decay_steps = 0, that reshapes its remaining lr.)
RECIPE_FIELDS = ("seed", "loss", "optim", "train.batch_size", "data.train_split",
                 "data.crop_scale", "data.title_augment_prob",
                 "data.title_augment_char_rate", "data.shuffle_seed", "data.canvas_size")
# Model fields that change how the computation runs, not what it computes.
HOW_FIELDS = ("model.remat", "model.remat_policy", "model.attention")
PATH_FIELDS = ("data.rope_dir", "data.prepared_dir", "data.vocab_path", "train.init_from")


class RunMismatchError(config_checks.ConfigError):
  """A job would run with another model, other input data or another recipe than the
  run of its workdir was trained with."""


@dataclasses.dataclass(frozen=True)
class Difference:
  field: str
  run_value: Any
  job_value: Any

  def __str__(self) -> str:
    return f"{self.field}: run {self.run_value!r}, now {self.job_value!r}"


# ---- reading and writing --------------------------------------------------------------


def run_path(workdir: str) -> str:
  return workdir_layout.run_file(workdir)


def load(workdir: str) -> dict | None:
  """The run description of `workdir`, or None when it has none.

  Raises:
    ValueError: run.json is there but not a run description (naming the file).
  """
  path = run_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: not a readable run description ({error}); move it aside to "
                     "record the run again from --config") from None
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise ValueError(f"{path}: no 'config' entry; move it aside to record the run again "
                     "from --config")
  return record


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (ConfigDict fields keep their type)."""
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def config_from_json(config_json: Mapping[str, Any]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples(dict(config_json)))


def recorded_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config of the run in `workdir` (None without run.json), for `--workdir` alone."""
  record = load(workdir)
  return None if record is None else config_from_json(record["config"])


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json(sort_keys=True))


def _sha256_file(path: str) -> str | None:
  try:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
  except OSError:
    return None


def code_version() -> dict:
  """{"version": package version, "git_commit": HEAD or None, "git_dirty": bool or None}.

  The commit is read when the package sits in a git checkout (a source tree), with git
  on the PATH; `git_dirty` says whether tracked files differed from it.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(cope_jax.__file__)))
  commit = dirty = None
  if os.path.exists(os.path.join(root, ".git")):
    try:
      commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
      status = subprocess.run(["git", "-C", root, "status", "--porcelain",
                               "--untracked-files=no"], capture_output=True, text=True,
                              timeout=10, check=True).stdout
      dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
      commit = dirty = None
  return {"version": cope_jax.__version__, "git_commit": commit, "git_dirty": dirty}


# ---- resolving a job's config ---------------------------------------------------------


def _absolute_paths(value: str) -> str:
  return ",".join(os.path.abspath(part.strip()) for part in value.split(",") if part.strip())


def resolve(config: ml_collections.ConfigDict,
            run_prepared_config: str | None = None) -> ml_collections.ConfigDict:
  """The config a job runs with: a copy with references resolved, the vocabulary size
  read, paths absolute and `data.prepared_config` named.

  An empty `data.prepared_config` means the run's (`run_prepared_config`) when there is
  a run, else the default of `data.prepared_dir` (its most recent prepare).
  """
  config = config_checks.resolve_vocab_size(config)
  for field in PATH_FIELDS:
    section, name = field.split(".")
    if config[section][name]:
      config[section][name] = _absolute_paths(config[section][name])
  if not config.data.prepared_config:
    if run_prepared_config:
      config.data.prepared_config = run_prepared_config
    elif os.path.isdir(config.data.prepared_dir):
      try:
        config.data.prepared_config = prepare.dataset_identity(config.data.prepared_dir)["config"]
      except FileNotFoundError:
        pass  # not prepared yet: the data checks say so, naming the command
  return config


def config_digest(config: ml_collections.ConfigDict) -> str:
  """The digest outputs record for a config (metrics.json's `config_digest`, the export
  manifest's `config_hash`): `config_checks.config_hash` of the config as `resolve`
  resolves it."""
  return config_checks.config_hash(resolve(config))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, Mapping):
    flat = {}
    for key, item in value.items():
      flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
  return {prefix: value}


def _matches(field: str, prefixes: Iterable[str]) -> bool:
  return any(field == prefix or field.startswith(prefix + ".") for prefix in prefixes)


def differences(run_config: Mapping[str, Any], job_config: Mapping[str, Any],
                protected: Sequence[str]) -> list[Difference]:
  """Fields under `protected` whose values differ (both configs as JSON dicts)."""
  before, after = _flat(run_config), _flat(job_config)
  found = []
  for field in sorted(set(before) | set(after)):
    if not _matches(field, protected) or _matches(field, HOW_FIELDS):
      continue
    old, new = before.get(field, "(absent)"), after.get(field, "(absent)")
    if old != new:
      found.append(Difference(field, old, new))
  return found


def changed_fields(run_config: Mapping[str, Any], job_config: Mapping[str, Any]) -> dict:
  """{field: [run value, job value]} of every field that differs (recorded per job)."""
  before, after = _flat(run_config), _flat(job_config)
  return {field: [before.get(field), after.get(field)]
          for field in sorted(set(before) | set(after))
          if before.get(field) != after.get(field)}


# ---- identities ----------------------------------------------------------------------


def prepared_identity(config: ml_collections.ConfigDict) -> dict:
  """The identity of the prepared data `config` reads (FileNotFoundError when gone)."""
  return prepare.dataset_identity(config.data.prepared_dir, config.data.prepared_config)


IDENTITY_FIELDS = ("name", "config", "version", "fingerprint", "metadata_digest")


def _identity_key(identity: Mapping[str, Any]) -> tuple:
  return tuple(identity.get(field) for field in IDENTITY_FIELDS)


def describe_identity(identity: Mapping[str, Any]) -> str:
  fingerprint = str(identity.get("fingerprint") or "")[:12]
  return (f"{identity.get('name')}/{identity.get('config')} {identity.get('version')} "
          f"(fingerprint {fingerprint})")


def _init_from(config: ml_collections.ConfigDict) -> dict:
  parts = [part for part in config.train.init_from.split(",") if part]
  return {"path": config.train.init_from,
          "conversions": {part: _sha256_file(os.path.join(part, "conversion.json"))
                          for part in parts}}


def describe(config: ml_collections.ConfigDict) -> dict:
  """The run description of a resolved config (what run.json holds)."""
  return {
      "format": RUN_FORMAT,
      "config": _config_json(config),
      "config_digest": config_checks.config_hash(config),
      "prepared_data": prepared_identity(config),
      "vocabulary": {"path": config.data.vocab_path,
                     "sha256": _sha256_file(config.data.vocab_path)},
      "init_from": _init_from(config),
      "code": code_version(),
      "recorded": _now(),
      "host": socket.gethostname(),
  }


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(config: ml_collections.ConfigDict, step: int | None = None,
               checkpoint: str = "") -> dict:
  """Where an output came from: the checkpoint, the config digest, the prepared data
  and the code. Nothing in it depends on when or where it was computed."""
  try:
    identity = prepared_identity(config)
    data = {key: identity.get(key) for key in IDENTITY_FIELDS}
  except (FileNotFoundError, ValueError):
    data = None
  return {"checkpoint_step": None if step is None else int(step), "checkpoint": checkpoint,
          "config_digest": config_checks.config_hash(config), "prepared_data": data,
          "code": code_version()}


# ---- the checks ----------------------------------------------------------------------


def _refuse(workdir: str, found: Sequence[Difference], what: str) -> None:
  lines = "\n".join(f"  {difference}" for difference in found)
  raise RunMismatchError(
      f"{run_path(workdir)}: this run was {what} with other values of {len(found)} "
      f"field(s):\n{lines}\nJobs on this folder read its config from {RUN_FILE} (give "
      "--workdir alone); evaluation fields (eval.*, evals.*) may change. To run with these "
      f"values anyway, add {ALLOW_CHANGE_FLAG}; to start a new run, use another --workdir.")


def _check_prepared_data(record: Mapping[str, Any], config: ml_collections.ConfigDict,
                         workdir: str, allow_change: bool) -> None:
  recorded = record.get("prepared_data") or {}
  try:
    current = prepared_identity(config)
  except FileNotFoundError as error:
    raise RunMismatchError(
        f"{run_path(workdir)}: the run was trained on the prepared data "
        f"{describe_identity(recorded)} in {record['config']['data']['prepared_dir']}, which "
        f"{config.data.prepared_dir} does not hold ({error}). Prepare it again with the "
        "options of its report, or point --config.data.prepared_dir at it.") from None
  if _identity_key(recorded) != _identity_key(current) and not allow_change:
    raise RunMismatchError(
        f"{run_path(workdir)}: the run was trained on the prepared data "
        f"{describe_identity(recorded)}, but {config.data.prepared_dir} now holds "
        f"{describe_identity(current)} under that name (prepared again from other inputs "
        f"or options). Its numbers would not be the run's. Add {ALLOW_CHANGE_FLAG} to use "
        "it anyway.")


def _check_vocabulary(record: Mapping[str, Any], config: ml_collections.ConfigDict,
                      workdir: str, allow_change: bool) -> None:
  recorded = (record.get("vocabulary") or {}).get("sha256")
  current = _sha256_file(config.data.vocab_path)
  if recorded and current != recorded and not allow_change:
    raise RunMismatchError(
        f"{run_path(workdir)}: the vocabulary {config.data.vocab_path} differs from the one "
        f"the run was trained with ({record['vocabulary']['path']}, sha256 "
        f"{recorded[:12]}; now {str(current)[:12]}). Add {ALLOW_CHANGE_FLAG} to use it "
        "anyway.")


def _append_job(workdir: str, job: str, config: ml_collections.ConfigDict,
                record: Mapping[str, Any] | None, config_source: str,
                overrides: Sequence[str], allowed: bool) -> None:
  if job != "train" and record is None:
    return  # not a run's folder (weights converted, never trained here)
  entry = {"job": job, "time": _now(), "config_source": config_source,
           "overrides": list(overrides), "config_digest": config_checks.config_hash(config)}
  if record is not None:
    entry["changed_fields"] = changed_fields(record["config"], _config_json(config))
    if allowed and entry["changed_fields"]:
      entry["allowed_by"] = ALLOW_CHANGE_FLAG
  result_files.append_json_line(workdir_layout.jobs_file(workdir), entry)


def _has_checkpoints(workdir: str) -> bool:
  directory = workdir_layout.checkpoints_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_training(config: ml_collections.ConfigDict, workdir: str, *,
                   allow_change: bool = False
                   ) -> tuple[ml_collections.ConfigDict, dict | None]:
  """The config a training of `workdir` runs with, and the run it resumes (None: a new
  run), after checking the one against the other. Writes nothing (`record_training`).

  A resumed run must keep the run's model, input data and recipe (`RunMismatchError`
  naming each field otherwise, unless `allow_change`) and read the same prepared data.
  A run.json without any checkpoint beside it describes a run that never saved a step:
  the training starts afresh and records itself again.
  """
  record = load(workdir)
  if record is not None and not _has_checkpoints(workdir):
    record = None
  config = resolve(config, (record or {}).get("config", {}).get("data", {}).get(
      "prepared_config"))
  if record is not None:
    found = differences(record["config"], _config_json(config),
                        MODEL_FIELDS + INPUT_FIELDS + RECIPE_FIELDS)
    if found and not allow_change:
      _refuse(workdir, found, "trained")
    _check_prepared_data(record, config, workdir, allow_change)
    _check_vocabulary(record, config, workdir, allow_change)
  return config, record


def record_training(config: ml_collections.ConfigDict, workdir: str, record: dict | None, *,
                    allow_change: bool = False, config_source: str = "",
                    overrides: Sequence[str] = ()) -> None:
  """Writes run.json for a new run (or, with `allow_change`, the changed config of a
  resumed one, listing the change under "amended") and the job's line in jobs.jsonl.
  Called by the process that writes the workdir, once the run is ready to start."""
  os.makedirs(workdir, exist_ok=True)
  if record is None or record["config_digest"] != config_checks.config_hash(config):
    description = describe(config)
    if record is not None:
      description["amended"] = record.get("amended", []) + [
          {"time": description["recorded"],
           "changed_fields": changed_fields(record["config"], description["config"])}]
      description["recorded"] = record.get("recorded")
    result_files.write_json(run_path(workdir), description, indent=1, sort_keys=True)
  _append_job(workdir, "train", config, record, config_source, overrides, allow_change)


def begin_job(config: ml_collections.ConfigDict, workdir: str, job: str, *,
              allow_change: bool = False, config_source: str = "",
              overrides: Sequence[str] = (), check_data: bool = True, writer: bool = True
              ) -> ml_collections.ConfigDict:
  """The config `job` (evaluate, export, serving, report) runs with on `workdir`.

  Without run.json (weights converted, never trained here) the config is resolved and
  nothing is compared. With one, a field that changes the model or its input data is
  refused (`RunMismatchError`, naming each) unless `allow_change`, and the prepared data
  must be the run's (`check_data`).
  """
  record = load(workdir)
  config = resolve(config, (record or {}).get("config", {}).get("data", {}).get(
      "prepared_config"))
  if record is not None:
    found = differences(record["config"], _config_json(config), MODEL_FIELDS + INPUT_FIELDS)
    if found and not allow_change:
      _refuse(workdir, found, "trained")
    if check_data:
      _check_prepared_data(record, config, workdir, allow_change)
    _check_vocabulary(record, config, workdir, allow_change)
  if writer:
    _append_job(workdir, job, config, record, config_source, overrides, allow_change)
  return config
