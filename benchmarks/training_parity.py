r"""Same recipe, same accuracy: whole training runs here and in the release's PyTorch set-up.

  python -m benchmarks.training_parity --data_dir demo_run          # the demo: 1,200 steps
  python -m benchmarks.training_parity --data_dir demo_run --seeds 5 --precision bfloat16
  python -m benchmarks.training_parity --config configs/synthetic_tiny.py \
      --config.data.rope_dir=R --config.data.prepared_dir=P --config.data.vocab_path=V

One config (default: the demo's `configs/synthetic_tiny.py`, on the data that
`scripts/demo.sh` leaves in `--data_dir`: DIR/rope and DIR/prepared) is trained for
`train.num_steps` steps (`--steps` to change it) once per seed and side:

  JAX      this project's trainer: `train.setup` and `train.run_steps` with its
           FiniteCheck and Logger hooks (no checkpoints), the step `train.train_step`.
  PyTorch  a loop that follows the release's `train.py` (cope_reference.md, "Training
           recipe"), on the reference model of `cope_jax/testing/torch_reference.py`:
           its parameter groups and lr factors (`release_param_groups`), AdamW, the
           gradients of the model only clipped to `optim.grad_clip_norm`, a `LambdaLR`
           stepped once every `optim.lr_every` steps (`ReleaseOptimizer`), the loss terms
           the release computes with the config's weights and, when
           `loss.classify_weight` > 0, the margin classifier (`parity.release_loss`).

What the two sides share, per seed s (0, 1, ...; `--seeds`, at least 3 for the report):

  initial weights  the reference built under `torch.manual_seed(s)` (PyTorch's own
                   initialisers), saved as a release checkpoint and converted with
                   `cope_jax.convert` (kind `cope`); JAX starts from the converted weights
                   (`train.init_from`), PyTorch from the module itself. Both sides'
                   embeddings of the first batch are compared before training. The
                   classifier's initial centres (when on) are JAX's, copied to PyTorch.
  batches          `data.shuffle_seed = s`; both sides read `pipelines.make_train_dataset`
                   (the same products, records, crops, flips and title noise in the same
                   order); a digest of every batch each side read is compared.
  randomness       `seed = s` (JAX's random key: the classifier's initial centres) and
                   `torch.manual_seed(s)`. Dropout is off (the reference model has none).
  recipe           every number from the config: lr, group factors, weight decay (the
                   release passes none, so PyTorch's default 0.01 runs there; the recipe
                   configs write 0.01, the demo's config its own value), betas, clip norm,
                   warm-up, decay end, `lr_every`. A setting the release's loop cannot
                   follow (gradient accumulation, frozen groups, clipping other groups,
                   sampled classes, dropout, augmentation on the device, a clamped
                   schedule that the run goes past) stops the benchmark with its name.

Precision: float32 on both sides (`--precision float32`, the default), so that any
difference is the recipe's; `--precision bfloat16` runs the JAX side with this project's
bfloat16 compute (PyTorch stays float32), to show what bf16 costs.

Evaluation, with the project's code on both sides, on `data.eval_split`, exact search:
JAX's final parameters through `evaluate.evaluate_params`; PyTorch's model embeds every
record of each domain (`ReferenceCOPE.embed`, the eval pipeline's batches), the
embeddings are written in the release's format (`{rank}_item`, `{rank}_photo`,
`{rank}_live`: `release_format.write_embeddings`) and scored by `compare.compare`.

Reports (a table on stdout, JSON at `--out`, default
benchmarks/results/training_parity.json, and the loss plot beside it, same name .png):
per seed and side each direction's R@1, R@5, R@10 and one-shot accuracy, their means and
standard deviations (over seeds, ddof=1), the difference of the means in units of the
PyTorch seeds' standard deviation (and the seeds' paired differences: seed s starts both
sides alike), the final losses (total and per term; the mean of the
last log window), both sides' loss curves (window means every `train.log_every` steps)
and the seconds per step of each side (steps 2 to N, data loading included, the time
spent waiting for batches given apart). PyTorch runs with `--torch_threads` CPU threads
(default 1: on a shared 2-core machine PyTorch's OpenMP threads slow down many times
when the cores are busy). The JSON is rewritten after every run, with `complete: false`
until the last. Without a JAX compilation cache configured, one in the workdir lets the
later seeds reuse the first one's compiled programs.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from cope_jax import checkpoints
from cope_jax import cli
from cope_jax import compare
from cope_jax import config_checks
from cope_jax import convert
from cope_jax import eval_report
from cope_jax import evaluate
from cope_jax import optim
from cope_jax import release_format
from cope_jax import state as state_lib
from cope_jax import train
from cope_jax.base import domains
from data_pipelines import pipelines
from data_pipelines import prepare

JAX, PYTORCH = "jax", "pytorch"
SIDES = (JAX, PYTORCH)
PRECISIONS = ("float32", "bfloat16")
DEFAULT_CONFIG = "configs/synthetic_tiny.py"
DEFAULT_OUT = os.path.join("benchmarks", "results", "training_parity.json")
METRICS = ("R@1", "R@5", "R@10", "one_shot_accuracy")
MODEL_GROUPS = ("text", "visual", "fusion")  # the release clips the model's gradients only
WITHIN = 2.0  # JAX's mean R@1 should lie within this many PyTorch standard deviations
DATA_PATH_OVERRIDES = ("--config.data.rope_dir", "--config.data.prepared_dir",
                       "--config.data.vocab_path")


# ----------------------------------------------------------------------------
# The run's config.


def check_release_can_follow(config) -> None:
  """Raises ValueError naming the config field the release's loop cannot follow."""
  optim_config = config.optim

  def refuse(field, why):
    raise ValueError(f"config.{field}: {why}; the release's training loop (the PyTorch "
                     "side of this benchmark) has no such setting")

  if optim_config.grad_accum_steps != 1:
    refuse("optim.grad_accum_steps", f"{optim_config.grad_accum_steps} (not 1)")
  if tuple(optim_config.frozen):
    refuse("optim.frozen", f"{tuple(optim_config.frozen)} (not empty)")
  if optim_config.grad_clip_norm and set(optim_config.grad_clip_groups) != set(MODEL_GROUPS):
    refuse("optim.grad_clip_groups", f"{tuple(optim_config.grad_clip_groups)}: it clips "
           f"the model's groups {MODEL_GROUPS} together, nothing else")
  if config.loss.classify_weight and config.loss.classify_sample_rate != 1.0:
    refuse("loss.classify_sample_rate", f"{config.loss.classify_sample_rate} (the release "
           "samples every class)")
  if config.model.text.dropout_rate or config.model.vision.drop_path_rate:
    refuse("model.text.dropout_rate / model.vision.drop_path_rate",
           "not 0 (the PyTorch reference model has no dropout)")
  if config.data.augment_on != "host":
    refuse("data.augment_on", f"{config.data.augment_on!r} (the PyTorch side reads the "
           "pipeline's host-augmented batches)")
  steps = config.train.num_steps
  if (optim_config.clamp_after_decay
      and optim.num_scheduler_steps(optim_config, steps) > optim.decay_end(optim_config, steps)):
    refuse("optim.clamp_after_decay", "True, and the run goes past the cosine's end "
           f"(config.optim.decay_steps={optim_config.decay_steps}): the release's LambdaLR "
           "never clamps")


def benchmark_config(config, steps: int, precision: str):
  """The config both sides train: `steps` (0: the config's), the JAX side's compute dtype,
  no evaluation during training, exact search at the end, the vocabulary size read."""
  config = copy.deepcopy(config)
  if precision not in PRECISIONS:
    raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
  if steps:
    config.train.num_steps = steps
  config.model.dtype = precision
  config.train.checkpoint_every = config.train.num_steps
  for entry in config.evals.values():
    entry.every = 0
  config.eval.search = "exact"  # as compare ranks: both sides scored without an index
  optim.group_schedules(config.optim, config.train.num_steps)  # its errors, before any run
  check_release_can_follow(config)
  return config_checks.resolve_vocab_size(config)


def seeded(config, seed: int, init_from: str = ""):
  """The config of one seed: its data order, its JAX randomness, its initial weights."""
  config = copy.deepcopy(config)
  config.seed = seed
  config.data.shuffle_seed = seed
  config.train.init_from = init_from
  return config


# ----------------------------------------------------------------------------
# Shared initial weights.


def initial_reference(config, seed: int):
  """The PyTorch reference with PyTorch's initialisers under `torch.manual_seed(seed)`."""
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  return torch_reference.ReferenceCOPE(config.model,
                                       clip_text=state_lib.needs_clip_text(config))


def convert_initial_weights(reference, config, out_dir: str) -> str:
  """Saves `reference` as the release saves its checkpoints (`module.` keys) and converts
  it with `cope_jax.convert`; returns the converted folder (`train.init_from`)."""
  import torch  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  checkpoint = os.path.join(out_dir, "release_checkpoint.pth")
  torch.save({"state_dict": {f"module.{key}": value
                             for key, value in reference.state_dict().items()},
              "epoch": 0}, checkpoint)
  converted = os.path.join(out_dir, "converted")
  convert.run(checkpoint, "cope", config, converted)
  return converted


def initial_embedding_difference(config, reference, converted_dir: str,
                                 batch: Mapping[str, np.ndarray]) -> float:
  """Largest difference between the two sides' L2-normalised embeddings of `batch`
  before training (float32 both)."""
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import parity  # pylint: disable=g-import-not-at-top

  float32 = copy.deepcopy(config)
  float32.model.dtype = "float32"
  params = checkpoints.load_params(converted_dir)["model"]
  model = state_lib.build_model(float32)
  got = jax.jit(model.apply)({"params": params}, dict(batch))
  reference.eval()
  with torch.no_grad():
    want = reference(parity.torch_batch(batch))
  return max(parity.max_abs_diff(got[name], want[name]) for name in want)


# ----------------------------------------------------------------------------
# Both sides' training.


def batch_digest(batch: Mapping[str, np.ndarray]) -> str:
  """A digest of a training batch: every array's key, dtype, shape and bytes."""
  digest = hashlib.blake2b(digest_size=16)
  for key in sorted(batch):
    value = np.ascontiguousarray(batch[key])
    digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _runs_digest(digests: Sequence[str]) -> str:
  return hashlib.blake2b("".join(digests).encode(), digest_size=16).hexdigest()


class _DigestingIterator:
  """The trainer's data iterator, recording `batch_digest` of every batch it hands out."""

  def __init__(self, iterator):
    self._iterator = iterator
    self.digests: list[str] = []

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self.digests.append(batch_digest(batch))
    return batch


class _StepClock:
  """A trainer hook: when each step was handed back, and the time spent getting its batch."""

  def __init__(self):
    self.times: list[float] = []
    self.data_seconds: list[float] = []

  def __call__(self, step, state, metrics):
    self.times.append(time.perf_counter())
    self.data_seconds.append(float(metrics.get("data_wait_seconds", 0.0)))

  def close(self):
    pass


def _step_timing(first_step_end: float, end: float, steps: int,
                 data_seconds: Sequence[float]) -> dict[str, float]:
  """Seconds per step over steps 2..N (step 1 holds the compilation), and the part of
  it spent waiting for batches."""
  later = max(steps - 1, 1)
  return {"seconds_per_step": (end - first_step_end) / later,
          "data_seconds_per_step": float(np.sum(data_seconds[1:])) / later}


def _windows(config) -> list[tuple[int, int]]:
  """The log windows (first step, last step), as the trainer's Logger closes them."""
  every, total = config.train.log_every, config.train.num_steps
  ends = [step for step in range(1, total + 1) if step % every == 0 or step == total]
  return list(zip([1] + [end + 1 for end in ends[:-1]], ends))


def _loss_keys(config) -> list[str]:
  """The logged losses: `loss` (the weighted total) and `loss/<term>` (unweighted)."""
  terms = [term for term, weight in config.loss.weights.items() if weight]
  if config.loss.classify_weight:
    terms.append("classification")
  return ["loss"] + [f"loss/{term}" for term in terms]


def train_jax(config, workdir: str) -> dict[str, Any]:
  """This project's trainer from `config.train.init_from`, then `evaluate_params`."""
  run = train.setup(config, workdir)
  initial = run.state.params.get("classifier")
  initial_centers = (None if initial is None
                     else np.asarray(jax.device_get(initial["centers"]), np.float32))
  reader = _DigestingIterator(run.data_iterator)
  run.data_iterator = reader
  clock = _StepClock()
  hooks = [train.FiniteCheck(run), train.Logger(run), clock]
  state = train.run_steps(run, hooks)
  jax.block_until_ready(state.params)
  end = time.perf_counter()
  run.manager.close()
  timing = _step_timing(clock.times[0], end, config.train.num_steps, clock.data_seconds)
  records = [record for record in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if "loss" in record]
  curves = {key: [record[key] for record in records] for key in _loss_keys(config)}
  metrics = evaluate.evaluate_params(config, workdir, state.params["model"],
                                     config.train.num_steps, run.mesh)
  return {"steps": [record["step"] for record in records], "curves": curves,
          "metrics": _direction_metrics(metrics), "digests": reader.digests,
          "initial_classifier": initial_centers, **timing}


def train_pytorch(config, reference, initial_centers: np.ndarray | None, workdir: str
                  ) -> dict[str, Any]:
  """The release's training loop (see the module docstring), then the release-format
  embeddings of the eval split scored by `compare`."""
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import parity  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(config.seed)
  optim_config, loss_config = config.optim, config.loss
  classifier = torch.nn.Module()  # the release's classifier group, empty when it is off
  if loss_config.classify_weight:
    classifier = torch_reference.MarginClassifier(
        initial_centers.shape[0], config.model.emb_dim, scale=loss_config.classify_scale,
        margin=loss_config.classify_margin)
    with torch.no_grad():
      classifier.weight.copy_(torch.from_numpy(np.array(initial_centers)))
  factors = optim_config.lr_factors
  release = torch_reference.ReleaseOptimizer(
      reference, classifier, lr=optim_config.learning_rate, text_factor=factors.text,
      visual_factor=factors.visual, fusion_factor=factors.fusion,
      other_factor=factors.classifier, warm_up_iters=optim_config.warmup_steps,
      max_iters=optim.decay_end(optim_config, config.train.num_steps),
      lr_freq=optim_config.lr_every, max_norm=optim_config.grad_clip_norm or math.inf)
  # The release's AdamW runs PyTorch's defaults (weight decay 0.01, betas 0.9, 0.999);
  # the config's values, the same in the recipe configs, so that both sides run one recipe.
  for group in release.optimizer.param_groups:
    group["weight_decay"] = optim_config.weight_decay
    group["betas"] = (optim_config.b1, optim_config.b2)

  reference.train()
  data = iter(pipelines.make_train_dataset(config))
  keys = _loss_keys(config)
  per_step = {key: [] for key in keys}
  digests, data_seconds, first_step_end = [], [], 0.0
  for step in range(1, config.train.num_steps + 1):
    fetch_start = time.perf_counter()
    batch = next(data)
    data_seconds.append(time.perf_counter() - fetch_start)
    digests.append(batch_digest(batch))
    inputs = parity.torch_batch(batch)
    embeddings = reference(inputs)
    loss, terms = parity.release_loss(embeddings, inputs["product_index"], classifier,
                                      loss_config)
    if not math.isfinite(loss.item()):
      raise FloatingPointError(f"PyTorch side: non-finite loss at step {step}")
    release.step(loss)
    per_step["loss"].append(loss.item())
    for term, value in terms.items():
      per_step[f"loss/{term}"].append(value.item())
    if step == 1:
      first_step_end = time.perf_counter()
  timing = _step_timing(first_step_end, time.perf_counter(), config.train.num_steps,
                        data_seconds)
  windows = _windows(config)
  curves = {key: [float(np.mean(values[first - 1:last])) for first, last in windows]
            for key, values in per_step.items()}
  metrics = evaluate_pytorch(config, reference, workdir)
  return {"steps": [last for _, last in windows], "curves": curves, "metrics": metrics,
          "digests": digests, **timing}


def evaluate_pytorch(config, reference, workdir: str) -> dict[str, dict[str, float]]:
  """Embeds every record of the eval split with the PyTorch model, writes the release's
  embedding files and scores them with `compare` (as a release run's files are)."""
  import torch  # pylint: disable=g-import-not-at-top
  from cope_jax.testing import parity  # pylint: disable=g-import-not-at-top

  release_dir = os.path.join(workdir, "release_embeddings")
  os.makedirs(release_dir, exist_ok=True)
  split = config.data.eval_split
  reference.eval()

  def batches(dataset, domain):
    with torch.no_grad():
      for batch in dataset:
        valid = np.asarray(batch["valid"], bool)
        embeddings = reference.embed(parity.torch_batch(batch), domain.name).numpy()
        yield batch["id"][valid], batch["product_id"][valid], embeddings[valid]

  for domain in domains.DOMAINS:
    dataset = pipelines.make_eval_dataset(config, domain.name)
    times = (release_format.clip_times(prepare.open_domain(config.data.prepared_dir, split,
                                                           domain.name),
                                       dataset.record_range)
             if domain.release_times else None)
    release_format.write_embeddings(release_dir, domain.name, 0, batches(dataset, domain),
                                    times)
  result = compare.compare(release_dir, config.data.rope_dir, split,
                           out_dir=os.path.join(workdir, "compare"),
                           one_shot_draws=config.eval.one_shot_draws)
  return _direction_metrics(result["metrics"][compare.REFERENCE])


def _direction_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  return {name: {key: metrics[name][key] for key in METRICS}
          for name in domains.DIRECTION_NAMES if name in metrics and "skipped" not in metrics[name]}


def _read_jsonl(path: str) -> list[dict]:
  import json  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------
# Summaries.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarise(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Per direction and metric: each side's per-seed values, mean and std, the difference
  of the means and that difference in PyTorch standard deviations."""
  summary = {}
  for name in domains.DIRECTION_NAMES:
    if not all(run["metrics"].get(name) for side in SIDES for run in runs[side]):
      continue
    entry = {}
    for metric in METRICS:
      row = {}
      for side in SIDES:
        values = [run["metrics"][name][metric] for run in runs[side]]
        row[side] = values
        row[f"{side}_mean"], row[f"{side}_std"] = mean_std(values)
      difference = row["jax_mean"] - row["pytorch_mean"]
      spread = row["pytorch_std"]
      row["difference"] = difference
      # Seed s starts both sides from the same weights on the same batches: the seeds'
      # paired differences, JAX - PyTorch.
      paired = np.subtract(row[JAX], row[PYTORCH])
      row["paired_difference_mean"], row["paired_difference_std"] = mean_std(paired)
      row["difference_in_pytorch_std"] = difference / spread if spread > 0 else (
          0.0 if difference == 0 else math.copysign(math.inf, difference))
      row[f"within_{WITHIN:g}_pytorch_std"] = abs(difference) <= WITHIN * spread
      entry[metric] = row
    summary[name] = entry
  return summary


def final_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Per side and loss key: the last log window's mean per seed, their mean and std."""
  result = {}
  for side in SIDES:
    result[side] = {}
    for key in runs[side][0]["curves"]:
      values = [run["curves"][key][-1] for run in runs[side]]
      mean, std = mean_std(values)
      result[side][key] = {"per_seed": values, "mean": mean, "std": std}
  return result


def plot_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                title: str) -> None:
  """Total and per-term loss curves of both sides: the seeds' mean, and their band
  (lowest to highest seed) shaded."""
  keys = list(runs[JAX][0]["curves"])
  columns = min(4, len(keys))
  rows = -(-len(keys) // columns)
  figure, _ = eval_report.new_figure()
  figure.set_size_inches(4.2 * columns, 3.2 * rows)
  figure.clear()
  colours = {JAX: "tab:blue", PYTORCH: "tab:orange"}
  for index, key in enumerate(keys):
    axes = figure.add_subplot(rows, columns, index + 1)
    for side in SIDES:
      steps = np.asarray(runs[side][0]["steps"])
      values = np.asarray([run["curves"][key] for run in runs[side]], np.float64)
      axes.plot(steps, values.mean(axis=0), color=colours[side],
                linestyle="-" if side == JAX else "--",
                label="JAX" if side == JAX else "PyTorch (release)")
      axes.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colours[side],
                        alpha=0.25, linewidth=0)
    axes.set_title("total loss (weighted)" if key == "loss" else key.removeprefix("loss/"),
                   fontsize="medium")
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if index == 0:  # the curves fall from the upper left: the upper right is free
      axes.legend(fontsize="small", loc="upper right")
  figure.suptitle(f"{title}\nlines: the mean over the seeds; bands: lowest to highest seed "
                  f"(window means every {runs[JAX][0]['steps'][0]} steps)", fontsize="medium")
  eval_report.save_figure(figure, path)


def _row(values: Mapping[str, Any], metric: str) -> str:
  return (f"{values['jax_mean']:7.1%} ± {values['jax_std']:5.1%}   "
          f"{values['pytorch_mean']:7.1%} ± {values['pytorch_std']:5.1%}   "
          f"{values['difference_in_pytorch_std']:+7.2f}")


def print_tables(result: Mapping[str, Any]) -> None:
  seeds = result["seeds"]
  print(f"\ntraining parity: {result['config']}, {result['steps']} steps, seeds {seeds}, "
        f"JAX {result['precision'][JAX]} / PyTorch {result['precision'][PYTORCH]}")
  print(f"{'direction':16} {'metric':9} {'JAX mean ± std':>17}   {'PyTorch mean ± std':>17}"
        f"   {'Δ/σ_PT':>7}")
  for name, entry in result["summary"].items():
    for metric in METRICS:
      label = "one-shot" if metric == "one_shot_accuracy" else metric
      print(f"{name:16} {label:9} {_row(entry[metric], metric)}")
  print(f"\nper seed R@1 (JAX | PyTorch; the seeds' paired difference JAX - PyTorch, "
        f"mean ± std), seeds {seeds}")
  for name, entry in result["summary"].items():
    row = entry["R@1"]
    print(f"{name:16} " + " ".join(f"{v:6.1%}" for v in row[JAX]) + "  | "
          + " ".join(f"{v:6.1%}" for v in row[PYTORCH])
          + f"  | {row['paired_difference_mean']:+6.1%} ± {row['paired_difference_std']:.1%}")
  print("\nfinal loss (last window), mean ± std over seeds")
  for key in result["final_losses"][JAX]:
    jax_loss, torch_loss = (result["final_losses"][side][key] for side in SIDES)
    print(f"{key:28} JAX {jax_loss['mean']:8.4f} ± {jax_loss['std']:.4f}   "
          f"PyTorch {torch_loss['mean']:8.4f} ± {torch_loss['std']:.4f}")
  timing = result["seconds_per_step"]
  print(f"\nseconds per step (steps 2..N, data included; waiting for data): "
        f"JAX {timing[JAX]['mean']:.3f} ({timing[JAX]['data_mean']:.3f}), "
        f"PyTorch {timing[PYTORCH]['mean']:.3f} ({timing[PYTORCH]['data_mean']:.3f}) "
        f"with {result['machine']['torch_threads']} thread(s)")
  verdict = result["verdict"]
  print(f"JAX mean R@1 within {WITHIN:g} PyTorch std in every direction: "
        f"{verdict['r1_within_all']}; same batches on both sides: {verdict['same_batches']}")


# ----------------------------------------------------------------------------
# The benchmark.


def _data_summary(config) -> dict[str, Any]:
  products = prepare.load_products(config.data.prepared_dir, config.data.train_split)
  records = {}
  for split in (config.data.train_split, config.data.eval_split):
    records[split] = {domain: len(prepare.open_domain(config.data.prepared_dir, split,
                                                      domain))
                      for domain in domains.NAMES}
  return {"train_products_with_all_domains": len(pipelines.train_products(products)),
          "records": records}


def _recipe(config) -> dict[str, Any]:
  optim_config = config.optim
  return {
      "batch_size": config.train.batch_size, "steps": config.train.num_steps,
      "learning_rate": optim_config.learning_rate,
      "lr_factors": dict(optim_config.lr_factors), "weight_decay": optim_config.weight_decay,
      "betas": [optim_config.b1, optim_config.b2], "grad_clip_norm": optim_config.grad_clip_norm,
      "warmup_scheduler_steps": optim_config.warmup_steps,
      "decay_end_scheduler_step": optim.decay_end(optim_config, config.train.num_steps),
      "lr_every": optim_config.lr_every, "loss_weights": dict(config.loss.weights),
      "classify_weight": config.loss.classify_weight,
      "temperature": config.loss.temperature, "label_smoothing": config.loss.label_smoothing,
      "image_size": config.data.image_size, "num_frames": config.data.num_frames,
      "emb_dim": config.model.emb_dim, "log_every": config.train.log_every,
  }


def _machine(torch_threads: int, load_at_start: float) -> dict[str, Any]:
  """The machine (`load_average_1min`: now) with PyTorch's version and threads."""
  import torch  # pylint: disable=g-import-not-at-top
  return common.machine(jax=True, torch_version=torch.__version__,
                        torch_threads=torch_threads,
                        load_average_1min_at_start=load_at_start)


def run_benchmark(config, *, config_name: str, seeds: int, steps: int, precision: str,
                  torch_threads: int, workdir: str, out: str) -> dict[str, Any]:
  """Trains and evaluates both sides for seeds 0..seeds-1; writes `out` and its plot."""
  import torch  # pylint: disable=g-import-not-at-top

  if seeds < 1:
    raise ValueError(f"--seeds {seeds}: at least 1 (3 or more for a standard deviation "
                     "worth reporting)")
  torch.set_num_threads(torch_threads)
  if not jax.config.jax_compilation_cache_dir:  # later seeds reuse the compiled programs
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
  load_at_start = round(os.getloadavg()[0], 2)
  config = benchmark_config(config, steps, precision)
  plot_path = os.path.splitext(out)[0] + ".png"
  result: dict[str, Any] = {
      "benchmark": "training_parity", "config": config_name, "steps": config.train.num_steps,
      "seeds": list(range(seeds)),
      "precision": {JAX: precision, PYTORCH: "float32"},
      "recipe": _recipe(config), "data": _data_summary(config),
      "machine": _machine(torch_threads, load_at_start), "plot": os.path.basename(plot_path),
      "runs": {side: [] for side in SIDES}, "complete": False}
  runs = {side: [] for side in SIDES}

  def write():
    result["machine"] = _machine(torch_threads, load_at_start)  # the load average now
    result["runs"] = {side: [{key: value for key, value in run.items()
                              if key not in ("digests", "initial_classifier")}
                             for run in runs[side]] for side in SIDES}
    common.write_result(out, result, quiet=True)

  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for seed in range(seeds):
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    if os.path.exists(seed_dir) and os.listdir(seed_dir):
      raise FileExistsError(f"{seed_dir}: holds an earlier run (the trainer would resume "
                            "it); pass an empty --workdir")
    reference = initial_reference(seeded(config, seed), seed)
    converted = convert_initial_weights(reference, seeded(config, seed),
                                        os.path.join(seed_dir, "initial"))
    seed_config = seeded(config, seed, init_from=converted)
    first_batch = next(iter(pipelines.make_train_dataset(seed_config)))
    difference = initial_embedding_difference(seed_config, reference, converted, first_batch)
    print(f"seed {seed}: converted initial weights; embeddings of the first batch differ by "
          f"at most {difference:.2e}", flush=True)

    started = time.perf_counter()
    jax_run = train_jax(seed_config, os.path.join(seed_dir, JAX))
    jax_run.update(seed=seed, initial_embedding_max_abs_diff=difference,
                   wall_seconds=time.perf_counter() - started)
    runs[JAX].append(jax_run)
    print(f"seed {seed}: JAX trained and evaluated in {jax_run['wall_seconds']:.0f} s "
          f"({jax_run['seconds_per_step']:.3f} s/step)", flush=True)
    write()

    started = time.perf_counter()
    torch_run = train_pytorch(seed_config, reference, jax_run["initial_classifier"],
                              os.path.join(seed_dir, PYTORCH))
    torch_run.update(seed=seed, wall_seconds=time.perf_counter() - started)
    for run in (jax_run, torch_run):
      run["batches_digest"] = _runs_digest(run["digests"])
      run["same_batches_as_other_side"] = jax_run["digests"] == torch_run["digests"]
    runs[PYTORCH].append(torch_run)
    print(f"seed {seed}: PyTorch trained and evaluated in {torch_run['wall_seconds']:.0f} s "
          f"({torch_run['seconds_per_step']:.3f} s/step); same batches: "
          f"{torch_run['same_batches_as_other_side']}", flush=True)
    write()

  result["summary"] = summarise(runs)
  result["final_losses"] = final_losses(runs)
  result["seconds_per_step"] = {
      side: {"per_seed": [run["seconds_per_step"] for run in runs[side]],
             "mean": mean_std([run["seconds_per_step"] for run in runs[side]])[0],
             "data_mean": mean_std([run["data_seconds_per_step"] for run in runs[side]])[0]}
      for side in SIDES}
  within = {name: entry["R@1"][f"within_{WITHIN:g}_pytorch_std"]
            for name, entry in result["summary"].items()}
  result["verdict"] = {
      "r1_within_pytorch_std": WITHIN, "r1_within": within,
      "r1_within_all": all(within.values()) and len(within) == len(domains.DIRECTION_NAMES),
      "same_batches": all(run["same_batches_as_other_side"] for run in runs[PYTORCH])}
  plot_losses(runs, plot_path, f"{config_name}: {config.train.num_steps} steps, "
              f"{seeds} seeds per side, JAX {precision} / PyTorch float32")
  result["complete"] = True
  write()
  return result


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  define = dict(flag_values=flag_values)
  flags.DEFINE_string("data_dir", "", "a folder as scripts/demo.sh leaves it: DIR/rope "
                      "(with vocab.txt) and DIR/prepared; sets the config's data paths "
                      "(default: the config's own)", **define)
  flags.DEFINE_integer("seeds", 3, "seeds per side (0, 1, ...): initial weights, data "
                       "order, randomness", **define)
  flags.DEFINE_integer("steps", 0, "training steps (0: the config's train.num_steps)",
                       **define)
  flags.DEFINE_enum("precision", "float32", PRECISIONS, "the JAX side's compute dtype "
                    "(PyTorch: float32)", **define)
  flags.DEFINE_integer("torch_threads", 1, "PyTorch CPU threads", **define)
  flags.DEFINE_string("out", "", f"JSON file (default {DEFAULT_OUT}, or "
                      "training_parity_bfloat16.json beside it); the plot beside it", **define)


def _job(args, config_name: str) -> None:
  config = args.config
  if args.data_dir:
    config.data.rope_dir = os.path.join(args.data_dir, "rope")
    config.data.prepared_dir = os.path.join(args.data_dir, "prepared")
    config.data.vocab_path = os.path.join(args.data_dir, "rope", "vocab.txt")
  out = args.out or os.path.join(
      REPO_ROOT, DEFAULT_OUT if args.precision == "float32"
      else DEFAULT_OUT.replace(".json", f"_{args.precision}.json"))
  kwargs = dict(config_name=config_name, seeds=args.seeds, steps=args.steps,
                precision=args.precision, torch_threads=args.torch_threads, out=out)
  if args.workdir:
    result = run_benchmark(config, workdir=args.workdir, **kwargs)
  else:
    with tempfile.TemporaryDirectory(prefix="cope_training_parity_") as workdir:
      result = run_benchmark(config, workdir=workdir, **kwargs)
  print_tables(result)
  print(f"\nwrote {out} and {result['plot']}")


def _config_description(argv: Sequence[str]) -> str:
  """The config file and the overrides of the command line (data paths left out)."""
  name, overrides = DEFAULT_CONFIG, []
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      name = arg.split("=", 1)[1]
    elif arg == "--config" and index + 1 < len(argv):
      name = argv[index + 1]
    elif arg.startswith("--config.") and not arg.startswith(DATA_PATH_OVERRIDES):
      overrides.append(arg)
  return " ".join([name] + overrides)


def main(argv=None) -> None:
  arguments = sys.argv[1:] if argv is None else list(argv)
  command = cli.command("python -m benchmarks.training_parity", __doc__,
                        config=DEFAULT_CONFIG, workdir_required=False,
                        workdir_help="folder for the runs (default: a temporary one, "
                                     "removed at the end)",
                        define_flags=_define_flags)
  cli.run_job(command, lambda args: _job(args, _config_description(arguments)), argv)


if __name__ == "__main__":
  main()
