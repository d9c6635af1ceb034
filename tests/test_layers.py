"""Step options of the model layers: rematerialisation policies (config.model.remat_policy)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cope_jax.models import layers
from cope_jax.models import vision
from cope_jax.models.config import ModelConfig
from tests import test_models


@pytest.mark.parametrize("policy", ["dots_saveable", "nothing_saveable"])
@pytest.mark.slow
def test_remat_policies_give_the_same_gradients(policy):
  model_config = test_models.tiny_model_config()
  typed = ModelConfig.from_config(model_config)
  frames = test_models.make_batch()["video_frames"]
  encoders = {remat: vision.VisualEncoder(dataclasses.replace(
      typed.vision, remat=remat, remat_policy=policy)) for remat in (False, True)}
  params = encoders[False].init(jax.random.PRNGKey(0), frames)["params"]

  def loss(p, encoder):
    return jnp.sum(encoder.apply({"params": p}, frames) ** 2)

  plain, remat = (jax.jit(jax.grad(loss), static_argnums=1)(params, encoders[r])
                  for r in (False, True))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, encoders[True]))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               plain, remat)


def test_unknown_remat_policy_names_the_field():
  model_config = test_models.tiny_model_config()
  model_config.remat_policy = "save_nothing"
  with pytest.raises(ValueError, match=r"config\.model\.remat_policy"):
    ModelConfig.from_config(model_config)
  assert layers.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
