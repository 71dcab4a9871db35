r"""GLUE finetuning of a BiPFT student (or of its FP teacher): the release's recipe per task.

`get_config("task=NAME")`; NAME is one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli
(ax, the diagnostic set, is predicted by the MNLI run), rt_demo (the offline Rotten Tomatoes demo)
or custom (CSV/JSONL files and labels of your own).

  # a pretrained student (a `bipft pretrain` workdir or `bipft convert from-pytorch` output)
  bipft finetune --config configs/glue.py:task=rte --workdir runs/rte --init_from runs/pretrain \
      --config.data.path=glue_data
  # the FP baseline from the teacher (a Hugging Face BERT folder; empty path = all-MiniLM-L6-v2)
  bipft finetune --config configs/glue.py:task=rte --workdir runs/rte_fp --config.data.path=glue_data \
      --config.init.kind=teacher --config.init.path=bert-base-uncased/
  # a student initialised from the teacher's weights, binarized (no binary pretraining)
  ... --config.init.kind=teacher --config.init.binary=True
  # TFDS instead of the GLUE folders:  --config.data.format=tfds --config.data.path=~/tensorflow_datasets
  # CSV/JSONL files of a GLUE task (its labels), or of a task of your own (task=custom, 3 epochs):
  ... --config.data.format=jsonl --config.data.train_file=a.jsonl --config.data.dev_file=b.jsonl \
      --config.data.text_fields=premise,hypothesis --config.data.label_field=gold
  bipft finetune --config configs/glue.py:task=custom --workdir runs/mine --init_from runs/pretrain \
      --config.data.format=csv --config.data.train_file=train.csv --config.data.dev_file=dev.csv \
      --config.data.text_fields=review --config.data.label_field=stars --config.data.labels=1,2,3,4,5
  # the offline demo (<= 10 minutes on 2 CPU cores)
  bipft finetune --config configs/glue.py:task=rt_demo --workdir runs/rt --init_from runs/pretrain_demo
  bipft glue-report --workdirs runs/cola runs/sst2 ... --submission_dir submission/
  # downstream distillation from the finetuned FP teacher (BiT-style; see `distill` below)
  ... --config.distill.teacher=runs/rt_fp
  # a mesh and several hosts, as pretraining (configs/meshes.py, launch/)
  launch/local.sh --processes 2 --devices-per-process 2 -- finetune --config configs/glue.py:task=rt_demo,mesh=local-2x2 ...

Recipe (METHOD.md section 7): AdamW lr 2e-5, constant, no warm-up, weight decay 0, batch 32, max
length 128, seed 42, dropout 0.1, the pooler on [CLS] (`pooling=mean`: on the mean of the real
tokens); epochs CoLA 50, MNLI 6, MRPC 20, SST-2 10, STS-B 20, QQP 6, QNLI 10, RTE 20 (WNLI: 20,
RTE's). rt_demo cuts the recipe to fit 10 CPU minutes (see below).
"""
import os
import sys

import ml_collections

from bipft_jax.glue import tasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meshes  # noqa: E402  (configs/meshes.py, beside this file)
import model as model_configs  # noqa: E402  (configs/model.py, beside this file)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = dict(item.partition("=")[::2] for item in (arg or "").replace(" ", "").split(",") if item)
  unknown = sorted(set(options) - {"task", "mesh"})
  if unknown:
    raise ValueError(f"unknown glue option(s) {unknown}; the options are task=NAME and mesh=NAME (configs/meshes.py)")
  if "task" not in options:
    raise ValueError(f"name the task: configs/glue.py:task=NAME with NAME in {', '.join(tasks.TASKS)}")
  if options["task"] == "custom":
    task = tasks.custom_task("", 3)  # labels come from --config.data.labels
  else:
    task = tasks.get_task(options["task"])
  if task.name == "ax":
    raise ValueError("ax (the diagnostic set) has no training data: it is predicted by the mnli run")

  c = ml_collections.ConfigDict()
  c.task = task.name
  c.name = ""                      # the row label in `bipft glue-report`; empty = described from init
  c.seed = 42                      # the release's seed
  c.epochs = task.epochs
  c.batch_size = 32
  c.eval_batch_size = 64           # no gradients: twice the batch fits the same memory
  c.max_length = 128               # tokens, [CLS]/[SEP] included; longer pairs truncated longest-first
  c.min_bucket = 16                # batches pad to 16, 32, 64, ... max_length: one compile per bucket
  c.steps_per_epoch = 0            # > 0: cut each epoch to this many steps (demos, smoke tests)
  # > 0: stop after this many epochs in a row without a better dev score than the best epoch's (its
  # selection metric); 0 = every epoch, the release's recipe (CoLA runs 50).
  c.early_stop_patience = 0
  # With early stopping: an epoch counts as better only if it beats the best score so far by more than
  # this many points of the metric (as reported: accuracy in %); 0 = any gain.
  c.early_stop_min_delta = 0.0
  c.max_train_examples = 0         # > 0: train on the first N (shuffled once by `seed`) only
  c.log_every = 10                 # steps between metrics.jsonl/TensorBoard loss points
  c.checkpoint_every = 0           # steps between checkpoints (a killed run resumes there); 0 = each epoch's end
  # A jax.profiler trace of `steps` steps from `first_step` (0: none) into WORKDIR/profile, for
  # TensorBoard's profile plugin or ui.perfetto.dev (bipft_jax/profiling.py).
  c.profile = ml_collections.ConfigDict({"first_step": 0, "steps": 3})

  # Devices: `mesh=NAME` (configs/meshes.py; default every device on data), as pretraining. Several
  # hosts: `distributed.enabled` or BIPFT_DISTRIBUTED=1 (the launch scripts set it).
  c.mesh = meshes.get_config(options.get("mesh", "data"))
  c.distributed = ml_collections.ConfigDict({"enabled": False})

  c.init = ml_collections.ConfigDict()
  c.init.kind = "checkpoint"       # checkpoint (--init_from) | teacher (a PyTorch BERT folder) | scratch
  c.init.path = ""                 # teacher: empty = all-MiniLM-L6-v2 from the asset cache
  c.init.step = -1                 # checkpoint step; -1 = the latest
  c.init.binary = False            # teacher only: False = the FP baseline, True = the teacher binarized
  # Architecture for init.kind=scratch (random weights: smoke tests only); the binarization fields
  # also apply to init.kind=teacher with init.binary=True. A checkpoint brings its own.
  c.model = ml_collections.ConfigDict({k: v for k, v in model_configs.get_config("tiny,binary").to_dict().items() if k not in _TASK_FIELDS})
  c.dropout = 0.1                  # hidden, attention and the pooled output before the classifier
  c.pooling = "cls"                # the pooler's input: cls (the release) | mean (over real tokens)
  # fp32 | mixed (FP matmuls on bf16 operands, fp32 accumulation: README "Numerics and speed"); the
  # finetuned checkpoint keeps it, so its evaluation and exports compute the same way. Empty: the
  # init's (a checkpoint's own; fp32 for a teacher or scratch).
  c.precision = ""
  # Recompute each layer's activations in the backward instead of keeping them (jax.checkpoint per
  # layer): less memory for long sequences or large batches, for about one more forward a step.
  c.remat = False

  # Downstream (task-level) distillation from a finetuned classifier: a `bipft finetune` workdir or a
  # Hugging Face classifier folder. loss = label_weight * CE(labels) + logit_weight * softCE(s/T, t/T)
  # + hidden_weight * sum_l MSE(H_s^l, H_t^(l T/S)) + attention_weight * the same over attention
  # probabilities. Defaults as BiT (Liu et al. 2022), facebookresearch/bit kd_learner_glue.py and
  # scripts/run_glue.sh: no ground-truth term while distilling, logits at temperature 1 (its
  # --temperature default), the hidden states' MSE summed over the embedding output and every layer;
  # attention distillation off (BiT's 2022-09 update made it optional and its script leaves it out).
  # The paper's "task-specific baseline" is init.kind=teacher, init.binary=True with a distill.teacher.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""           # empty: no distillation
  c.distill.label_weight = 0.0
  c.distill.logit_weight = 1.0
  c.distill.temperature = 1.0
  c.distill.hidden_weight = 1.0
  c.distill.attention_weight = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-5
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.total_steps = 0      # filled in from epochs x steps (used by the linear schedule)
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8           # torch AdamW's default
  c.optimizer.head_lr_multiplier = 1.0  # the fresh classifier's learning rate relative to the rest
  c.optimizer.max_grad_norm = 0.0  # gradients scaled down to this global norm when above it; 0 = never (the release)

  c.data = ml_collections.ConfigDict()
  c.data.format = "glue"           # glue (the distribution's TSVs) | tfds | csv | jsonl
  c.data.path = ""                 # glue: glue_data/ or the task folder; tfds: the data_dir
  c.data.train_file = ""           # csv / jsonl files
  c.data.dev_file = ""
  c.data.test_file = ""            # unlabeled: predicted at the end (submission/), or by `bipft evaluate --split test`
  c.data.text_fields = "sentence"  # csv / jsonl: one field, or two comma-separated for pairs
  c.data.label_field = "label"
  c.data.labels = ""               # task=custom: the classes as written in the files ("neg,pos"); empty = regression
  c.data.tokenizer = ""            # a folder with vocab.txt; empty = the init folder's, else MiniLM's
  c.data.dev_fraction = 0.1        # rt_demo: the fixed dev share ...
  c.data.split_seed = 0            # ... and the seed of its permutation

  if task.name == "custom":
    c.data.format = "jsonl"
  if task.name == "rt_demo":
    # 10 CPU minutes: the snippets are short (median 26 tokens, 96% <= 48), so length 48 in two
    # buckets (two compiles); three epochs over a 2,400-example sample (228 steps) at a higher
    # learning rate than the recipe's, the fresh classifier 10x faster still.
    # Mean pooling: MiniLM (a sentence-transformers model, trained on mean-pooled embeddings) keeps
    # its [CLS] an attention sink, constant across sentences below its last layer, and the distilled
    # student inherits it. From the 300-step demo pretraining, measured on the 2-core CPU (dev
    # accuracy, majority class 56.9%): [CLS] pooling 56.7% (nothing learned in 3 epochs), mean
    # pooling 67.3%, plus the 10x classifier 70.3% (68.5% with seed 1); one epoch over 7,200
    # examples 64.7%. The FP teacher and its numbers: README.md.
    c.max_length = 48
    c.min_bucket = 32
    c.epochs = 3
    c.max_train_examples = 2400
    c.pooling = "mean"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.head_lr_multiplier = 10.0
  return c


# Model fields every finetuning run sets from the task and the fields above, whatever its init.
_TASK_FIELDS = ("num_labels", "hidden_dropout", "attention_dropout", "classifier_dropout", "pooling", "precision",
                "remat")
