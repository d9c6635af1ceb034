"""Configs for tests and benchmarks: the synthetic_tiny recipe shrunk further so a step
takes milliseconds."""

from configs import synthetic_tiny


def training_config(prepared_dir, rope_dir, num_steps=4):
  config = shrink(synthetic_tiny.get_config())
  config.data.prepared_dir = str(prepared_dir)
  config.data.rope_dir = str(rope_dir)
  config.data.vocab_path = f"{rope_dir}/vocab.txt"
  config.train.num_steps = num_steps
  return config


def shrink(config):
  """`config` with the small shapes of SMALL_FIELDS (changed in place; returned)."""
  config.update_from_flattened_dict(SMALL_FIELDS)
  return config


# field -> value, shared by the in-process configs and the command-line overrides.
SMALL_FIELDS = {
    "data.image_size": 32,
    "data.num_frames": 2,
    "data.title_max_length": 16,
    "data.asr_max_length": 16,
    "model.emb_dim": 16,
    "model.vision.patch_size": 16,
    "model.vision.width": 32,
    "model.vision.layers": 1,
    "model.vision.heads": 2,
    "model.vision.mlp_dim": 64,
    "model.vision.output_dim": 16,
    "model.vision.mit_heads": 2,
    "model.text.hidden_size": 32,
    "model.text.layers": 1,
    "model.text.heads": 2,
    "model.text.intermediate_size": 64,
    "model.text.max_positions": 32,
    "train.batch_size": 8,
    "train.log_every": 2,
    "train.checkpoint_every": 2,
    "optim.warmup_steps": 1,
    "eval.batch_size": 8,
}


def command_line_overrides(prepared_dir, rope_dir):
  """The same shrinking as `--config.x=y` flags for a subprocess."""
  return [f"--config.data.prepared_dir={prepared_dir}", f"--config.data.rope_dir={rope_dir}",
          f"--config.data.vocab_path={rope_dir}/vocab.txt"] + [
              f"--config.{field}={value}" for field, value in SMALL_FIELDS.items()]
