"""The top-level configs stand alone: none derives from another, all declare the same fields.

Shared sections come from `configs/common.py`; the two stages of the released recipe
differ only in their loss terms and their starting point.
"""

import ast
import importlib
import pathlib

import pytest

from configs import common
from configs import rope_vitb16
from configs import rope_vitb16_stage1
from cope_jax import losses

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHARED = {"__init__", "common"}
TOP_LEVEL = sorted(path.stem for path in CONFIGS_DIR.glob("*.py") if path.stem not in SHARED)
# The fields in which stage 1 differs from stage 2 (their docstrings say why).
STAGE_FIELDS = ("loss.weights.", "train.init_from", "train.init_allow_missing")


def _flat(config, prefix=""):
  """'a.b.c' -> value of every leaf field."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _config_modules_imported(path):
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom) and node.module == "configs":
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found.update(alias.name.split(".")[1] for alias in node.names
                   if alias.name.startswith("configs."))
  return found


def test_no_top_level_config_imports_another():
  assert {"synthetic_tiny", "rope_vitb16", "rope_vitb16_stage1"} <= set(TOP_LEVEL)
  for name in TOP_LEVEL:
    imported = _config_modules_imported(CONFIGS_DIR / f"{name}.py")
    assert imported <= {"common"}, f"configs/{name}.py imports configs {sorted(imported)}"
  assert not _config_modules_imported(CONFIGS_DIR / "common.py")


def test_every_config_declares_the_same_fields_with_the_same_types():
  flat = {name: _flat(importlib.import_module(f"configs.{name}").get_config())
          for name in TOP_LEVEL}
  reference_name = "synthetic_tiny"
  reference = flat[reference_name]
  for name, fields in flat.items():
    assert sorted(fields) == sorted(reference), name
    differing = {field: (type(reference[field]).__name__, type(value).__name__)
                 for field, value in fields.items() if type(value) is not type(reference[field])}
    assert not differing, f"{name} vs {reference_name}: {differing}"


def test_the_two_release_stages_differ_only_in_their_stage_fields():
  stage1 = _flat(rope_vitb16_stage1.get_config())
  stage2 = _flat(rope_vitb16.get_config())
  differing = sorted(field for field in stage2 if stage1[field] != stage2[field])
  assert differing and all(field.startswith(STAGE_FIELDS) for field in differing), differing
  on = {name: {field.rpartition(".")[2] for field, weight in flat.items()
               if field.startswith("loss.weights.") and weight}
        for name, flat in (("stage1", stage1), ("stage2", stage2))}
  assert on["stage1"] == set(rope_vitb16_stage1.IN_DOMAIN_WEIGHTS)
  assert on["stage2"] == set(rope_vitb16.CROSS_DOMAIN_WEIGHTS)
  assert stage1["train.init_from"] == rope_vitb16_stage1.CONVERTED_ENCODERS
  assert stage2["train.init_from"] == rope_vitb16.STAGE1_WORKDIR


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_the_model_follows_the_data_sizes(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.data.image_size = 96
  config.data.num_frames = 3
  assert (config.model.vision.image_size, config.model.vision.num_frames) == (96, 3)


def test_each_config_gets_its_own_shared_sections():
  first, second = rope_vitb16.get_config(), rope_vitb16_stage1.get_config()
  first.eval.batch_size = 7
  first.mesh.model = 2
  first.loss.weights.video_live = 0.5
  assert (second.eval.batch_size, second.mesh.model) == (256, 1)
  assert second.loss.weights.video_live == 0.0
  assert rope_vitb16.get_config().loss.weights.video_live == 1.0


def test_loss_weights_cover_the_loss_term_table():
  assert list(common.LOSS_TERMS) == list(losses.CONTRASTIVE_TERMS)
  weights = common.loss_weights({"video_live": 0.2})
  assert dict(weights) == {term: (0.2 if term == "video_live" else 0.0)
                           for term in losses.CONTRASTIVE_TERMS}
  with pytest.raises(ValueError, match="unknown loss terms"):
    common.loss_weights({"video_video": 1.0})


def test_compiler_options_parse_and_a_malformed_one_names_the_field():
  from cope_jax import config_checks  # pylint: disable=g-import-not-at-top
  assert config_checks.compiler_options("") == {}
  assert config_checks.compiler_options(
      "xla_tpu_scheduler_percent_shared_memory_limit=80, xla_flag_b=False,xla_c=fast") == {
          "xla_tpu_scheduler_percent_shared_memory_limit": 80, "xla_flag_b": False,
          "xla_c": "fast"}
  for text in ("xla_a", "percent=80", "xla_a=1,,oops=2"):
    with pytest.raises(config_checks.ConfigError, match=r"config\.train\.compiler_options"):
      config_checks.compiler_options(text)
  for name in TOP_LEVEL:  # no config sets XLA options by default
    assert importlib.import_module(f"configs.{name}").get_config().train.compiler_options == ""
