"""The built-in default run: a CPU-sized COPE on the synthetic ROPE-format dataset.

  python -m cope_jax.train --config configs/synthetic_tiny.py --workdir demo_run

Every field the code reads is declared here, the sections every config holds alike
(mesh, distributed, evaluation search settings, the loss-term table) through
`configs/common.py`. The paper-size recipe (`configs/rope_vitb16_stage1.py`,
`configs/rope_vitb16.py`) is written on its own, not derived from this one.
"""

import ml_collections

from configs import common


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data -------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.rope_dir = "demo_run/rope"  # ROPE-format directory (nine txt files per split + images)
  data.prepared_dir = "demo_run/prepared"  # ArrayRecord shards written by data_pipelines.prepare
  # Which prepared config of prepared_dir to read ("": its most recent prepare when a
  # run starts; a run records the one it read, and later jobs read that one).
  data.prepared_config = ""
  data.vocab_path = "demo_run/rope/vocab.txt"  # WordPiece vocabulary (rbt vocab for real data)
  data.train_split = "training"
  data.eval_split = "test"
  data.image_size = 64  # square input side of the visual encoder
  data.num_frames = 4  # T: frames sampled per video / live clip
  data.title_max_length = 32  # tokens, [CLS] and [SEP] included
  data.asr_max_length = 32
  data.crop_scale = (0.64, 1.0)  # random-resized-crop area range (train)
  data.title_augment_prob = 0.6  # chance a title of >= 10 characters is perturbed
  data.title_augment_char_rate = 0.2  # share of its characters doubled/dropped/spaced
  # Where the training random-resized-crop, resize and flip run: "host" (in the input
  # pipeline) or "device" (inside the jitted train step; the host then only decodes
  # frames and resizes them to a canvas_size square). Same crop boxes either way.
  data.augment_on = "host"
  data.canvas_size = 0  # side of the frames sent with augment_on="device" (0: image_size)
  data.num_workers = 0  # Grain worker processes (0: in the main process)
  data.num_threads = 2  # Grain reader threads per process (JPEG decoding releases the GIL)
  data.prefetch_buffer_size = 2
  data.shuffle_seed = 0

  # ---- model ------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.emb_dim = 64
  model.dtype = "float32"  # compute dtype: float32 | bfloat16
  model.param_dtype = "float32"
  model.remat = False  # rematerialise each transformer block in the backward pass
  # What a rematerialised block keeps from its forward pass: a jax.checkpoint_policies
  # name (nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable | ...).
  model.remat_policy = "nothing_saveable"
  # Attention kernel: "xla" (any backend), "cudnn" (flash attention; NVIDIA GPU with
  # bfloat16/float16 compute) or "auto" (cudnn where it can run, else xla).
  model.attention = "xla"
  model.use_asr_text = False  # extension: fuse ASR text into the video/live heads
  model.vision = vision = ml_collections.ConfigDict()
  vision.image_size = data.get_ref("image_size")
  vision.patch_size = 16
  vision.width = 64
  vision.layers = 2
  vision.heads = 4
  vision.mlp_dim = 256
  vision.output_dim = 64  # CLIP `proj` output (512 for ViT-B/16)
  vision.num_frames = data.get_ref("num_frames")  # length of the MIT positional embedding
  vision.mit_layers = 1
  vision.mit_heads = 4
  vision.drop_path_rate = 0.0
  model.text = text = ml_collections.ConfigDict()
  text.vocab_size = 0  # 0: read the size from data.vocab_path
  text.hidden_size = 64
  text.layers = 2
  text.heads = 4
  text.intermediate_size = 256
  text.max_positions = 64
  text.type_vocab_size = 2
  text.layer_norm_eps = 1e-12
  text.dropout_rate = 0.0

  # ---- losses -----------------------------------------------------------------
  config.loss = loss = ml_collections.ConfigDict()
  loss.temperature = 0.05
  loss.label_smoothing = 0.1
  # One weight per term of the loss-term table (cope_jax/losses.py); 0 switches it off.
  # The seven cross-domain terms of the released forward pass; the in-domain text <->
  # visual terms (the release's stage 1) are off.
  loss.weights = common.loss_weights({
      "page_visual_video": 1.0,
      "page_visual_live": 1.0,
      "video_live": 1.0,
      "page_video": 1.0,
      "page_live": 1.0,
      "page_text_video": 1.0,
      "page_text_live": 1.0,
  })
  loss.classify_weight = 0.0  # `use_spu_classify`: margin classification over products
  loss.classify_scale = 64.0
  loss.classify_margin = 0.4
  loss.classify_sample_rate = 1.0  # share of negative class centres used per step

  # ---- optimiser --------------------------------------------------------------
  # Schedule: λ(e) of the scheduler step e = update // lr_every; linear warm-up from 0
  # over warmup_steps, then cosine to 0 at decay_steps (cope_jax/optim.py).
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-3  # base lr; each group multiplies it by its factor
  optim.lr_factors = ml_collections.ConfigDict(  # text/visual encoder, rest of model, classifier
      {"text": 1.0, "visual": 1.0, "fusion": 1.0, "classifier": 1.0})
  optim.weight_decay = 5e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.warmup_steps = 50  # scheduler steps of linear warm-up from lr 0
  optim.decay_steps = 0  # scheduler step at which the cosine reaches 0 (0: the run's end)
  optim.lr_every = 1  # optimiser updates per scheduler step (lr constant within a block)
  # Past decay_steps the lr stays 0: a cosine schedule is meant to end there. False
  # continues the cosine, so the lr rises again, as the release's unclamped LambdaLR does.
  optim.clamp_after_decay = True
  optim.grad_clip_norm = 1.0  # 0 disables clipping
  optim.grad_clip_groups = ("text", "visual", "fusion")  # clipped together; not the classifier
  optim.grad_accum_steps = 1
  optim.frozen = ()  # groups to freeze, e.g. ("text",)

  # ---- training loop ----------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 32  # global batch (all devices, all hosts)
  train.num_steps = 1200
  train.log_every = 50
  train.checkpoint_every = 200
  train.keep_checkpoints = 2
  train.init_from = ""  # converted checkpoint(s) (cope_jax.convert; comma-separated) or a training workdir
  train.init_allow_missing = False
  train.compiler_options = ""  # XLA options of the compiled step, 'xla_name=value,...'

  # ---- device mesh, multi-host, evaluation (as in every config) --------------
  config.mesh = common.mesh_config()
  config.distributed = common.distributed_config()
  config.eval = common.eval_config(batch_size=32)
  config.evals = common.evaluators(every=0)  # 0: evaluate at the end (python -m cope_jax.evaluate)
  return config
