"""The binarizer track (BiBench-style): every binarizer through the same distillation pretraining and
rt_demo finetuning, one table of accuracy, OPs and memory ratios, packed size and speed, training speed.

`get_config(VARIANT)`, VARIANT one of:
  quick  configs/pretrain.py:demo cut to 20 steps at length 32 and rt_demo to one epoch over 640
         examples (20 steps): most of a row is compiling (about ten programs: pretraining, evaluation,
         finetuning and prediction per length bucket, packed and simulated forwards). A smoke comparison:
         20 steps move a student little from its binarized teacher (README.md: measured rows, reading).
  full   the demo pretraining (300 steps) and rt_demo (3 epochs over 2,400 examples) unchanged, as
         README.md reports the default binarizer's (about 10 minutes a row on an idle 2-core CPU).
  tiny   a random tiny teacher on files of your own, a few steps (tests): set the pretraining data
         and tokenizer and the finetuning data as below.

Launch:
  bipft track --config configs/track.py:quick --workdir workdirs/track
  bipft track --config configs/track.py:full --workdir workdirs/track_full --config.rows=bipft,xnor,react
  bipft track --config configs/track.py:tiny --workdir /tmp/track \\
      --config.pretrain.overrides.data.paths=corpus.txt \\
      --config.pretrain.overrides.data.eval_paths=heldout.txt \\
      --config.pretrain.overrides.tokenizer=VOCAB_DIR --config.finetune.overrides.data.path=glue_data \\
      --config.finetune.overrides.data.tokenizer=VOCAB_DIR
Rerunning a command with the same workdir skips the rows it finished (WORKDIR/ROW/row.json) and
resumes the one it was in (the pretraining from its checkpoint). The table: WORKDIR/track.md, .json.
"""
import os

import ml_collections

from bipft_jax import policy

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("quick", "full", "tiny")
# Every linear binarizer with the release's elastic attention probabilities, then BiViT's softmax-aware
# probabilities with the release's Linear and with BiViT's own (the whole of BiViT).
ROWS = (*policy.LINEAR_BINARIZERS, "bipft+bivit", "bivit_weight+bivit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "quick"
  if variant not in VARIANTS:
    raise ValueError(f"unknown track variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict()
  # The rows, in table order: LINEAR[+PROBS], a linear binarizer (model.linear_binarizer) and an
  # attention-probability binarizer (model.attention_prob_binarizer; default elastic, the release's).
  c.rows = ",".join(ROWS)

  # Each row runs `bipft pretrain --config CONFIG --config.KEY=VALUE...` with these overrides (nested
  # as in that config), then `bipft finetune` from its checkpoint the same way.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.config = f"{HERE}/pretrain.py:{'tiny' if variant == 'tiny' else 'demo'}"
  c.finetune = ml_collections.ConfigDict()
  c.finetune.config = f"{HERE}/glue.py:task={'sst2' if variant == 'tiny' else 'rt_demo'}"
  if variant == "quick":
    # 20 steps (5 of warm-up), sequences of 32, evaluated and saved at the end only; 20 finetuning steps.
    c.pretrain.overrides = ml_collections.ConfigDict(dict(
        total_steps=20, optimizer=dict(warmup_steps=5), data=dict(max_seq_length=32, max_predictions=5),
        checkpoint_every=20, eval_every=20, eval_batches=4, log_every=5))
    c.finetune.overrides = ml_collections.ConfigDict(dict(epochs=1, max_train_examples=640))
  elif variant == "full":
    c.pretrain.overrides = ml_collections.ConfigDict()
    c.finetune.overrides = ml_collections.ConfigDict()
  else:
    c.rows = "bipft,bnn"
    c.pretrain.overrides = ml_collections.ConfigDict(dict(
        data=dict(paths="", eval_paths=""), tokenizer="", model=dict(vocab_size=128, num_layers=1),
        total_steps=3, checkpoint_every=3, eval_every=3, eval_batches=1, log_every=1))
    c.finetune.overrides = ml_collections.ConfigDict(dict(  # one device: 4 rows do not split over 8
        data=dict(path="", tokenizer=""), epochs=1, batch_size=4, eval_batch_size=8, max_length=32,
        min_bucket=32, mesh=dict(shape=dict(data=1))))

  # `bipft summary` of each row's student (OPs and memory ratios vs the FP model of its size).
  c.summary = ml_collections.ConfigDict()
  # The student's shape (the pretraining config's model), as configs/model.py names it.
  c.summary.model = f"{HERE}/model.py:{'tiny' if variant == 'tiny' else 'minilm-l6'},binary"
  c.summary.seq_len = 32 if variant == "tiny" else 128  # the paper's 128
  # Packed speed: the finetuned classifier's packed forward vs its simulated forward, one batch.
  c.speed = ml_collections.ConfigDict()
  c.speed.batch_size = 32       # rt_demo's training batch ...
  c.speed.length = 48           # ... at its max_length
  c.speed.repeats = 5           # the fastest of these, each side, alternating
  c.speed.kernel = "auto"       # packed.prepare's kernel: popcount | int8 | native | auto (this machine's fastest)
  if variant == "tiny":
    c.speed.batch_size, c.speed.length, c.speed.repeats = 4, 16, 2
  return c
