"""Checkpoint integrity on small pytrees: checksums, damage, fallback, shape mismatches."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from cope_jax import checkpoint_fit
from cope_jax import checkpoint_integrity
from cope_jax import checkpoints


def _state(seed: int, mesh=None) -> dict:
  """A train-state-like tree: float32 params (sharded over 8 devices when a mesh is given)."""
  rng = np.random.default_rng(seed)
  tree = {"step": jnp.asarray(seed, jnp.int32),
          "params": {"model": {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 4)),
                                                              jnp.float32),
                                         "bias": jnp.asarray(rng.normal(size=(4,)),
                                                             jnp.float32)}}},
          "opt_state": {"mu": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16)},
          "rng": jax.random.PRNGKey(seed)}
  if mesh is not None:
    kernel = tree["params"]["model"]["dense"]["kernel"]
    tree["params"]["model"]["dense"]["kernel"] = jax.device_put(
        kernel, NamedSharding(mesh, PartitionSpec("data", None)))
  return tree


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save_raw(manager, step, stored_state, recorded_state):
  """Saves `stored_state` with the integrity record of `recorded_state` (silent corruption)."""
  manager.save(step, args=ocp.args.Composite(**{
      checkpoints.STATE_ITEM: ocp.args.StandardSave(stored_state),
      checkpoints.INTEGRITY_ITEM: ocp.args.JsonSave(
          checkpoint_integrity.integrity_record(recorded_state))}), force=True)
  manager.wait_until_finished()


def _reference_checksum(array: np.ndarray) -> str:
  """NumPy re-implementation of the documented checksum: two wrapped uint32 sums."""
  words = np.ascontiguousarray(array).view(np.uint32).reshape(-1).astype(np.uint64)
  mixed = (words * 0x9E3779B1) % 2**32
  mixed ^= mixed >> 16
  weights = (2 * np.arange(words.size, dtype=np.uint64) + 1) % 2**32
  plain = int(mixed.sum() % 2**32)
  weighted = int(sum((int(m) * int(w)) % 2**32 for m, w in zip(mixed, weights)) % 2**32)
  return f"{plain:08x}{weighted:08x}"


def test_checksums_match_a_numpy_reference_on_any_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  values = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  sharded = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data", None)))
  single = checkpoint_integrity.integrity_record({"w": jnp.asarray(values)})["leaves"]["w"]
  spread = checkpoint_integrity.integrity_record({"w": sharded})["leaves"]["w"]
  assert single == spread
  assert single["checksum"] == _reference_checksum(values)
  assert single["shape"] == [16, 4] and single["dtype"] == "float32"
  # One changed bit, or two swapped rows, change the checksum.
  flipped = values.copy()
  flipped.view(np.uint32)[3, 1] ^= 1
  swapped = values[[1, 0] + list(range(2, 16))]
  for changed in (flipped, swapped):
    changed_record = checkpoint_integrity.integrity_record({"w": jnp.asarray(changed)})
    assert changed_record["leaves"]["w"]["checksum"] != single["checksum"]


def test_verify_names_checksum_and_non_finite_problems():
  state = _state(0)
  record = checkpoint_integrity.integrity_record(state)
  assert checkpoint_integrity.verify_integrity(state, record) is None
  changed = jax.tree.map(lambda x: x, state)
  changed["params"]["model"]["dense"]["bias"] = state["params"]["model"]["dense"]["bias"] + 1
  assert "checksum mismatch" in checkpoint_integrity.verify_integrity(changed, record)
  assert "params/model/dense/bias" in checkpoint_integrity.verify_integrity(changed, record)
  changed["params"]["model"]["dense"]["bias"] = state["params"]["model"]["dense"]["bias"].at[
      0].set(jnp.nan)
  assert checkpoint_integrity.verify_integrity(changed, record).startswith("non-finite values")


@pytest.mark.parametrize("corruption", ["changed values", "non-finite values"])
def test_damaged_latest_step_falls_back_and_is_moved_aside(tmp_path, corruption):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=2)
  good = _state(1, mesh)
  checkpoints.save_training_state(manager, 1, good, None)
  manager.wait_until_finished()
  newer = _state(2, mesh)
  stored = jax.tree.map(lambda x: x, newer)
  kernel = newer["params"]["model"]["dense"]["kernel"]
  stored["params"]["model"]["dense"]["kernel"] = (
      kernel * 1.5 if corruption == "changed values" else kernel.at[2, 3].set(jnp.inf))
  _save_raw(manager, 2, stored, newer)

  messages = []
  restored, step = checkpoints.restore_latest_intact(manager, _abstract(good), None,
                                                     log=messages.append)
  assert step == 1
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(good)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  kind = "checksum" if corruption == "changed values" else "non-finite"
  assert messages[0].startswith("checkpoint step 2 ") and "damaged" in messages[0]
  assert ("checksum mismatch" if kind == "checksum" else "non-finite") in messages[0]
  assert "params/model/dense/kernel" in messages[0]
  assert "trying step 1" in messages[0]
  # Moved aside (not deleted), out of the way of the next save of step 2 and of keep=2.
  moved = tmp_path / "checkpoints" / checkpoint_integrity.DAMAGED_DIR / f"2-{kind}"
  assert (moved / checkpoints.STATE_ITEM).is_dir()
  assert manager.all_steps() == [1]
  checkpoints.save_training_state(manager, 2, newer, None)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [1, 2]
  _, step = checkpoints.restore_latest_intact(manager, _abstract(good), None,
                                              log=messages.append)
  assert step == 2
  manager.close()


def test_no_intact_step_stops_and_deletes_nothing(tmp_path):
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=2)
  state = _state(1)
  # Step 1 without its integrity record, step 2 with values that differ from it.
  manager.save(1, args=ocp.args.Composite(
      **{checkpoints.STATE_ITEM: ocp.args.StandardSave(state)}), force=True)
  manager.wait_until_finished()
  _save_raw(manager, 2, _state(3), state)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  messages = []
  with pytest.raises(checkpoints.NoIntactCheckpointError) as error:
    checkpoints.restore_latest_intact(manager, _abstract(state), None, log=messages.append)
  assert "step 2: checksum mismatch" in str(error.value)
  assert "step 1: its integrity/ record is missing" in str(error.value)
  assert "Nothing was deleted" in str(error.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before == ["1", "2"]
  assert len(messages) == 2
  manager.close()


def test_restore_verified_reads_a_subtree_and_checks_it(tmp_path):
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=2)
  state = _state(5)
  checkpoints.save_training_state(manager, 5, state, None)
  manager.wait_until_finished()
  manager.close()
  subtree = {"params": {"model": _abstract(state)["params"]["model"]}}
  restored, step = checkpoints.restore_verified(str(tmp_path), subtree, partial=True)
  assert step == 5 and set(restored) == {"params"}
  np.testing.assert_array_equal(np.asarray(restored["params"]["model"]["dense"]["kernel"]),
                                np.asarray(state["params"]["model"]["dense"]["kernel"]))
  assert checkpoints.restore_verified(str(tmp_path / "elsewhere"), subtree) == (None, None)
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    checkpoints.restore_verified(str(tmp_path), subtree, 7, partial=True)


def _model_config(emb_dim: int = 16) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {
      "emb_dim": emb_dim, "text": {"vocab_size": 278, "hidden_size": 32, "layers": 1},
      "vision": {"width": 32, "layers": 1}}})


def _record_of_shapes(shapes: dict) -> dict:
  return {"format": checkpoint_integrity.INTEGRITY_FORMAT,
          "leaves": {path: {"shape": list(shape), "dtype": "float32", "checksum": "0" * 16,
                            "non_finite": 0} for path, shape in shapes.items()}}


def _abstract_of_shapes(shapes: dict) -> dict:
  tree = {}
  for path, shape in shapes.items():
    node = tree
    *parents, name = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return tree


WORDS = "params/model/text_encoder/bert_model/embeddings/word_embeddings/embedding"
HEAD = "params/model/page_head/fc1/kernel"
LAYER = "params/model/text_encoder/bert_model/encoder/layer_{}/output/dense/kernel"


@pytest.mark.parametrize("stored, model, config, listed, field", [
    ({WORDS: (301, 32), HEAD: (16, 16)}, {WORDS: (278, 32), HEAD: (16, 16)}, _model_config(),
     f"{WORDS}: checkpoint (301, 32) vs model (278, 32)", "model.text.vocab_size"),
    ({WORDS: (278, 32), HEAD: (16, 16)}, {WORDS: (278, 32), HEAD: (16, 32)},
     _model_config(emb_dim=32), f"{HEAD}: checkpoint (16, 16) vs model (16, 32)",
     "model.emb_dim (checkpoint 16, this config 32)"),
    ({LAYER.format(0): (64, 32), LAYER.format(1): (64, 32)}, {LAYER.format(0): (64, 32)},
     _model_config(), "1 entries only in the checkpoint", "model.text.layers"),
])
def test_shape_mismatch_lists_parameters_and_the_likely_config_field(stored, model, config,
                                                                     listed, field):
  with pytest.raises(checkpoint_fit.CheckpointMismatchError) as error:
    checkpoint_fit.check_fits(_record_of_shapes(stored), _abstract_of_shapes(model),
                           where="checkpoint step 4", config=config)
  message = str(error.value)
  assert message.startswith("checkpoint step 4 does not fit the model of this config")
  assert listed in message
  assert f"most likely differs: {field}" in message
  if field == "model.text.vocab_size":
    assert "data.vocab_path" in message


def test_matching_shapes_pass_and_partial_ignores_other_leaves():
  shapes = {WORDS: (278, 32), HEAD: (16, 16)}
  checkpoint_fit.check_fits(_record_of_shapes(shapes), _abstract_of_shapes(shapes), where="x")
  stored = dict(shapes, **{"opt_state/mu/x": (3,)})
  checkpoint_fit.check_fits(_record_of_shapes(stored), _abstract_of_shapes(shapes), where="x",
                         partial=True)
  with pytest.raises(checkpoint_fit.CheckpointMismatchError, match="only in the checkpoint"):
    checkpoint_fit.check_fits(_record_of_shapes(stored), _abstract_of_shapes(shapes), where="x")


def test_checkpoints_older_than_integrity_records_are_read_with_finiteness_checked(tmp_path):
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=3)
  good, newer = _state(1), _state(2)
  newer["params"]["model"]["dense"]["bias"] = newer["params"]["model"]["dense"]["bias"].at[
      1].set(jnp.nan)
  for step, state in ((1, good), (2, newer)):  # saved as before the records existed
    manager.save(step, args=ocp.args.Composite(
        **{checkpoints.STATE_ITEM: ocp.args.StandardSave(state)}), force=True)
  manager.wait_until_finished()
  messages = []
  restored, step = checkpoints.restore_latest_intact(manager, _abstract(good), None,
                                                     log=messages.append)
  assert step == 1 and "non-finite values" in messages[0]
  np.testing.assert_array_equal(np.asarray(restored["params"]["model"]["dense"]["kernel"]),
                                np.asarray(good["params"]["model"]["dense"]["kernel"]))
  manager.close()


# ---- another process count -----------------------------------------------------------


def _batches():
  """A checkpointable Grain iterator: batches of 2 consecutive integers."""
  return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def _written_by_two_processes(tmp_path, positions=(3, 3)):
  """A step saved as two processes save it: one data-iterator file per process.

  Written by this (one) process, then its data/ file replaced by the two files two
  processes leave, `process_<i>-of-2.json`, at `positions` (batches consumed).
  """
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=3)
  state = _state(4)
  iterator = _batches()
  checkpoints.save_training_state(manager, 4, state, iterator)
  manager.wait_until_finished()
  data_dir = tmp_path / "checkpoints" / "4" / checkpoints.DATA_ITEM
  (data_dir / "process_0-of-1.json").unlink()
  for index, position in enumerate(positions):
    (data_dir / f"process_{index}-of-2.json").write_text(json.dumps({"next_index": position}))
  return manager, state


def test_a_step_of_two_processes_resumes_on_one_at_the_same_data_position(tmp_path):
  manager, state = _written_by_two_processes(tmp_path)
  iterator = _batches()
  restored, step = checkpoints.restore_latest_intact(manager, _abstract(state), iterator,
                                                     log=pytest.fail)
  assert step == 4
  np.testing.assert_array_equal(next(iterator), [6, 7])  # the 4th batch: position 3
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # nothing moved aside
  manager.close()


def test_differing_positions_are_refused_naming_the_process_count_not_damage(tmp_path):
  manager, state = _written_by_two_processes(tmp_path, positions=(3, 5))
  messages = []
  with pytest.raises(checkpoints.CheckpointLayoutError,
                     match=r"written by 2 processes whose data-iterator positions differ.* "
                           r"resumes only on 2 processes \(this run has 1\)"):
    checkpoints.restore_latest_intact(manager, _abstract(state), _batches(),
                                      log=messages.append)
  assert messages == []  # not reported as damaged
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  manager.close()


def test_a_read_error_that_shows_no_damage_moves_nothing(tmp_path, monkeypatch):
  manager = checkpoints.checkpoint_manager(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpoints.save_training_state(manager, step, _state(step), None)
  manager.wait_until_finished()
  restore = manager.restore

  def failing_restore(step, args=None):  # e.g. out of memory while reading step 2
    if step == 2 and checkpoints.STATE_ITEM in args.keys():
      raise MemoryError("RESOURCE_EXHAUSTED: could not allocate 4.0G")
    return restore(step, args=args)

  monkeypatch.setattr(manager, "restore", failing_restore)
  with pytest.raises(checkpoints.CheckpointReadError,
                     match=r"checkpoint step 2 .* could not be read: MemoryError: "
                           r"RESOURCE_EXHAUSTED.* nothing was moved and no older step"):
    checkpoints.restore_latest_intact(manager, _abstract(_state(1)), None, log=pytest.fail)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  manager.close()
