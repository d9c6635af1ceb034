"""The released ViT-B/16 recipe, stage 1: in-domain text-visual alignment.

  python -m cope_jax.train --config configs/rope_vitb16_stage1.py \
    --workdir runs/rope_vitb16_stage1 \
    --config.data.rope_dir=/data/rope --config.data.prepared_dir=/data/rope_prepared \
    --config.data.vocab_path=/models/rbt6/vocab.txt

What the release's `scripts/train.sh` runs: only the three in-domain text<->visual terms
(its output folder is named for "cross-modal in-domain align" pretraining), from the
X-CLIP visual encoder and the rbt6 text encoder (converted with `python -m
cope_jax.convert`, README "Reproducing the release"); the fusion heads start fresh.
`configs/rope_vitb16.py` (stage 2) continues from this run's model. Every other field is
stage 2's, with its notes on where the release sets it.
"""

from configs import rope_vitb16

# The in-domain terms (`scripts/train.sh` flags, each 1.0).
IN_DOMAIN_WEIGHTS = {
    "page_text_visual": 1.0,  # page title <-> page image: --use_item_text_item_visual_cross 1.0
    "video_text_visual": 1.0,  # video ASR <-> frames: --use_photo_text_photo_visual_cross 1.0
    "live_text_visual": 1.0,  # live ASR <-> frames: --use_live_text_live_visual_cross 1.0
}

# Parameter checkpoints written by `python -m cope_jax.convert` (--kind xclip, --kind bert).
CONVERTED_ENCODERS = "runs/converted/xclip_k600_vitb16,runs/converted/rbt6"


def get_config():
  config = rope_vitb16.get_config()
  weights = config.loss.weights
  for term in rope_vitb16.CROSS_DOMAIN_WEIGHTS:  # commented out in scripts/train.sh
    weights[term] = 0.0
  for term, weight in IN_DOMAIN_WEIGHTS.items():
    weights[term] = weight
  # models/shark_model.py: xclip_vision(pretrained=True) and Roberta('rbt6') load the
  # pretrained encoders; the fusion heads start fresh, hence allow_missing.
  config.train.init_from = CONVERTED_ENCODERS
  config.train.init_allow_missing = True
  return config
