"""The released ViT-B/16 recipe, stage 1: in-domain text-visual alignment.

  python -m cope_jax.train --config configs/rope_vitb16_stage1.py \
    --workdir runs/rope_vitb16_stage1 \
    --config.data.rope_dir=/data/rope --config.data.prepared_dir=/data/rope_prepared \
    --config.data.vocab_path=/models/rbt6/vocab.txt

What the release's `scripts/train.sh` runs: only the three in-domain text<->visual terms
(its output folder is named for "cross-modal in-domain align" pretraining), from the
X-CLIP visual encoder and the rbt6 text encoder (converted with `python -m
cope_jax.convert`, README "Reproducing the release"); the fusion heads start fresh.
`configs/rope_vitb16.py` (stage 2) continues from this run's model. The sections both
stages share (data, model, loss settings, optimiser and schedule, training loop) are the
ViT-B/16 blocks of `configs/common.py`, with the release's setting next to each field;
this file sets what is stage 1's: its loss terms and its starting point.
"""

import ml_collections

from configs import common

# The in-domain terms (`scripts/train.sh` flags, each 1.0). The cross-domain terms are
# off: `scripts/train.sh` lists their flags commented out.
IN_DOMAIN_WEIGHTS = {
    "page_text_visual": 1.0,  # page title <-> page image: --use_item_text_item_visual_cross 1.0
    "video_text_visual": 1.0,  # video ASR <-> frames: --use_photo_text_photo_visual_cross 1.0
    "live_text_visual": 1.0,  # live ASR <-> frames: --use_live_text_live_visual_cross 1.0
}

# Parameter checkpoints written by `python -m cope_jax.convert` (--kind xclip, --kind bert).
CONVERTED_ENCODERS = "runs/converted/xclip_k600_vitb16,runs/converted/rbt6"


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = common.rope_vitb16_data()
  config.model = common.vitb16_model(config.data)
  config.loss = common.release_loss(IN_DOMAIN_WEIGHTS)
  config.optim = common.release_optim()
  # models/shark_model.py: xclip_vision(pretrained=True) and Roberta('rbt6') load the
  # pretrained encoders; the fusion heads start fresh, hence allow_missing.
  config.train = common.release_train(init_from=CONVERTED_ENCODERS, init_allow_missing=True)
  config.mesh = common.mesh_config()
  config.distributed = common.distributed_config()
  config.eval = common.eval_config(batch_size=256)
  config.evals = common.evaluators(every=5000)  # not a recipe field
  return config
