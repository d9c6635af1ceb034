"""Blocks the top-level configs share. Each returns a fresh ConfigDict section.

Two kinds:

- sections every config holds with the same values, whatever the run: `mesh_config`,
  `distributed_config`, `eval_config` (search settings; the batch size is the caller's)
  and the table of loss terms (`loss_weights`, every term of `cope_jax/losses.py` once);
- the released ViT-B/16 recipe's sections, which its two stages
  (`rope_vitb16_stage1.py`, `rope_vitb16.py`) share: `rope_vitb16_data`, `vitb16_model`,
  `release_loss`, `release_optim`, `release_train`. A stage sets only its loss terms and
  the parameters it starts from.

In the recipe's sections, next to each field: where the release sets it (cope_reference.md,
"Training recipe"). `train.py`, `scripts/train.sh` and `models/shark_model.py` are the
release's files; `--flag` is a `train.py` argument, with the value `scripts/train.sh`
passes.
"""

import ml_collections

# The contrastive terms of the loss-term table (cope_jax/losses.py), in its order.
LOSS_TERMS = (
    # the seven cross-domain terms of the released forward pass
    "page_visual_video",
    "page_visual_live",
    "video_live",
    "page_video",
    "page_live",
    "page_text_video",
    "page_text_live",
    # in-domain text <-> visual alignment (the release's stage-1 terms)
    "page_text_visual",
    "video_text_visual",
    "live_text_visual",
)


def loss_weights(weights):
  """`config.loss.weights`: one weight per term; the terms `weights` omits are off (0)."""
  unknown = sorted(set(weights) - set(LOSS_TERMS))
  if unknown:
    raise ValueError(f"unknown loss terms {unknown}; the terms are {', '.join(LOSS_TERMS)}")
  return ml_collections.ConfigDict({term: float(weights.get(term, 0.0)) for term in LOSS_TERMS})


# ----------------------------------------------------------------------------
# Sections every config holds alike.


def mesh_config():
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all remaining devices
  mesh.model = 1
  # Slices the 'data' axis spans (multi-slice TPU: data-centre network between them,
  # ICI within each); -1: as many as the devices come in (1 off multi-slice TPU).
  mesh.dcn_data = -1
  # logical axis name -> mesh axis (None: replicated)
  mesh.rules = (
      ("batch", "data"),
      ("classes", ("data", "model")),
      ("mlp", "model"),
      ("heads", "model"),
      ("vocab", None),
      ("embed", None),
      ("kv", None),  # per-head width of attention projections
  )
  return mesh


def distributed_config():
  """Multi-process start-up (cope_jax/distributed.py). The environment wins over these
  fields: COPE_DISTRIBUTED=1|0, COPE_COORDINATOR_ADDRESS, COPE_NUM_PROCESSES,
  COPE_PROCESS_ID, or JAX's names JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID; nothing else is read. A coordinator address switches start-up on;
  enabled with no address lets JAX discover the cluster (TPU pods, SLURM, Open MPI)."""
  distributed = ml_collections.ConfigDict()
  distributed.enabled = False
  distributed.coordinator_address = ""  # process 0's host:port
  distributed.num_processes = 1
  distributed.process_id = 0
  # Seconds: how long start-up waits for every process; after how long without
  # heartbeats a process counts as lost (and the others stop); how long a finishing
  # process waits for the others at the end.
  distributed.initialization_timeout = 300
  distributed.heartbeat_timeout = 100
  distributed.shutdown_timeout = 300
  return distributed


def eval_config(batch_size):
  evaluation = ml_collections.ConfigDict()
  evaluation.batch_size = batch_size
  # Search: exact ranking, or an index returning the top-10 (R@K from its list).
  evaluation.search = "auto"  # auto | exact | scann | faiss_hnsw | approx_topk (auto: next two)
  # Index kind of auto search (on TPU: approx_topk) and of export: scann | faiss_hnsw |
  # approx_topk (jax.lax.approx_max_k over the gallery split across the devices).
  evaluation.index = "scann"
  evaluation.index_min_gallery = 20000  # auto search: exact below this many gallery items
  # An index's search settings are tuned to reach this recall@10 against exact search
  # on `tune_queries` held-out queries; its recall is then measured on
  # `recall_check_queries` other ones (reported in metrics.json and the export manifest).
  # approx_topk takes it as approx_max_k's recall_target (nothing tuned).
  evaluation.target_recall = 0.98
  evaluation.tune_queries = 1000
  evaluation.recall_check_queries = 1000
  evaluation.scann_num_leaves = 0  # tree leaves; 0: about 2 sqrt(gallery size)
  evaluation.scann_soar_lambda = 0.0  # > 0: SOAR spilling (each item in a second leaf)
  evaluation.scann_num_leaves_to_search = 0  # > 0: hand-set instead of tuned
  evaluation.scann_reorder = 0  # candidates re-scored exactly; > 0: hand-set instead of tuned
  evaluation.hnsw_m = 32  # faiss_hnsw: graph links per node
  evaluation.hnsw_ef_construction = 200
  evaluation.hnsw_ef_search = 0  # > 0: hand-set instead of tuned
  evaluation.one_shot_draws = 5
  evaluation.checkpoint_step = -1  # -1: latest
  evaluation.report_examples = 8  # example queries in the HTML report
  return evaluation


# ----------------------------------------------------------------------------
# The released ViT-B/16 recipe: the sections both of its stages share.


def evaluators(every):
  """`config.evals`: the evaluators (cope_jax/evaluators/), each {type, every}; `every`:
  steps between runs during training (0: only `python -m cope_jax.evaluate`)."""
  return ml_collections.ConfigDict({
      "retrieval": {"type": "retrieval", "every": every},  # six directions, R@K, mAP
      "one_shot": {"type": "one_shot", "every": every},  # one prototype per product
  })


def rope_vitb16_data():
  """ROPE at the release's input sizes.

  The paths have no usable default: the trainer stops with an error naming each one that
  is unset.
  """
  data = ml_collections.ConfigDict()
  data.rope_dir = ""  # ROPE-format directory (nine txt files per split + images)
  data.prepared_dir = ""  # ArrayRecord shards written by data_pipelines.prepare
  data.prepared_config = ""  # e.g. frames8_side256 ("": the most recent prepare)
  data.vocab_path = ""  # the rbt vocabulary (21,128 entries)
  data.train_split = "training"
  data.eval_split = "test"
  data.image_size = 224  # --image_size (default 224)
  data.num_frames = 8  # --clip_length 8
  data.title_max_length = 32  # the release's training data loader
  data.asr_max_length = 32  # the release's training data loader
  data.crop_scale = (0.64, 1.0)  # train.py get_loaders: RandomResizedCrop(scale=(0.64, 1.0))
  data.title_augment_prob = 0.6  # the release's training data loader
  data.title_augment_char_rate = 0.2  # the release's training data loader
  # Not recipe fields: where the random resized crop runs and the canvas the host
  # resizes frames to when it runs on the device (benchmarks/data_pipeline.py).
  data.augment_on = "host"
  data.canvas_size = 256
  data.num_workers = 8  # not a recipe field (--workers 20 per GPU process)
  data.num_threads = 2  # not a recipe field: Grain reader threads per process
  data.prefetch_buffer_size = 2
  data.shuffle_seed = 0
  return data


def vitb16_model(data):
  """X-CLIP ViT-B/16 (8 frames) and rbt6; the image size and frame count follow `data`."""
  model = ml_collections.ConfigDict()
  model.emb_dim = 128  # --embedding_size 128
  # The release trains in fp16 autocast with a gradient scaler (--mixed_precision_training);
  # bfloat16 compute with float32 parameters needs no loss scaling.
  model.dtype = "bfloat16"
  model.param_dtype = "float32"
  model.remat = True  # not a recipe field: memory
  model.remat_policy = "nothing_saveable"  # not a recipe field (benchmarks/train_step.py)
  model.attention = "xla"  # not a recipe field: "auto" takes cuDNN flash attention on GPUs
  model.use_asr_text = False  # models/shark_model.py: video and live heads embed frames only
  # models/module_xclip.py xclip_vision: X-CLIP ViT-B/16, 8 frames
  model.vision = vision = ml_collections.ConfigDict()
  vision.image_size = data.get_ref("image_size")
  vision.patch_size = 16
  vision.width = 768
  vision.layers = 12
  vision.heads = 12
  vision.mlp_dim = 3072
  vision.output_dim = 512
  vision.num_frames = data.get_ref("num_frames")  # length of the MIT positional embedding
  vision.mit_layers = 4
  vision.mit_heads = 8
  vision.drop_path_rate = 0.0
  model.text = text = ml_collections.ConfigDict()  # models/shark_model.py: Roberta('rbt6')
  text.vocab_size = 21128
  text.hidden_size = 768
  text.layers = 6  # rbt6 as released (the paper describes rbt3: set 3 for it)
  text.heads = 12
  text.intermediate_size = 3072
  text.max_positions = 512
  text.type_vocab_size = 2
  text.layer_norm_eps = 1e-12
  text.dropout_rate = 0.1  # BertModel's hidden dropout in train mode
  return model


def release_loss(weights):
  """The loss with the stage's term weights (`weights`: term -> weight; the rest off)."""
  loss = ml_collections.ConfigDict()
  loss.temperature = 0.05  # models/shark_model.py: self.temp = 0.05
  loss.label_smoothing = 0.1  # models/shark_model.py: F.cross_entropy(label_smoothing=0.1)
  loss.weights = loss_weights(weights)
  loss.classify_weight = 0.0  # --use_spu_classify: not passed by scripts/train.sh
  loss.classify_scale = 64.0  # train.py build_model: CombinedMarginLoss(64, 1.0, 0.0, 0.4, 0)
  loss.classify_margin = 0.4  # same
  loss.classify_sample_rate = 1.0  # train.py build_model: PartialFC_V2(sample_rate=1.0)
  return loss


def release_optim():
  optim = ml_collections.ConfigDict()
  optim.learning_rate = 5e-3  # --lr 5e-3: torch.optim.AdamW(groups, lr=args.lr)
  optim.lr_factors = lr_factors = ml_collections.ConfigDict()  # per parameter group
  lr_factors.text = 1e-3  # --text_lr_factor 1e-3
  lr_factors.visual = 2e-3  # --visual_lr_factor 2e-3
  # --fusion_lr_factor 1.0: train.py build_optimizer's test for the fusion group is always
  # true, so every model parameter outside the two encoders is in it.
  lr_factors.fusion = 1.0
  lr_factors.classifier = 1.0  # --other_lr_factor 1.0 (the classifier's group)
  # PyTorch's AdamW default: --wd 5e-4 is parsed but never passed to the optimiser.
  optim.weight_decay = 0.01
  optim.b1 = 0.9  # PyTorch's AdamW default betas
  optim.b2 = 0.999
  # Schedule: train.py build_optimizer's LambdaLR (warm_up_with_cosine_lr), stepped in
  # train_one_epoch once every lr_freq optimiser steps; so steps 1-10 run at lr 0.
  optim.warmup_steps = 100  # --warm_up_iters 100 (scheduler steps: 1,000 optimiser steps)
  optim.decay_steps = 5000  # --max_iters 5000 (the cosine reaches 0 at step 50,000)
  optim.lr_every = 10  # --lr_freq 10
  # Past step 50,000 the release's λ follows the cosine back up (to the full lr again at
  # step 99,000): a side effect of an unclamped lambda, not a schedule anyone chose. We
  # clamp at 0 and end the run there (train.num_steps). For the release's exact run:
  # --config.optim.clamp_after_decay=False --config.train.num_steps=146400.
  optim.clamp_after_decay = True
  optim.grad_clip_norm = 5.0  # train.py train_one_epoch: clip_grad_norm_(max_norm=5)
  # ...on shark_model.parameters() only: the margin classifier is a separate module.
  optim.grad_clip_groups = ("text", "visual", "fusion")
  optim.grad_accum_steps = 1
  optim.frozen = ()  # --finetune: both encoders train
  return optim


def release_train(init_from, init_allow_missing):
  """The training loop, starting from the parameters in `init_from` (see train.init_from)."""
  train = ml_collections.ConfigDict()
  train.batch_size = 128  # --batch_size 8 per GPU x 8 GPUs x 2 nodes (scripts/train.sh)
  # --epochs 100 is 146,400 steps (1,464 a epoch at 187,431 products); with the clamp the
  # lr is 0 after step 50,000 (see optim.clamp_after_decay), so the run ends there.
  train.num_steps = 50_000
  train.log_every = 50  # not a recipe field
  train.checkpoint_every = 1000  # not a recipe field (the release saves every 5 epochs)
  train.keep_checkpoints = 3
  train.init_from = init_from
  train.init_allow_missing = init_allow_missing
  # XLA options for the compiled step, 'xla_name=value,...' (not a recipe field). On TPU,
  # e.g. 'xla_tpu_scheduler_percent_shared_memory_limit=80': see the README's TPU part.
  train.compiler_options = ""
  return train
