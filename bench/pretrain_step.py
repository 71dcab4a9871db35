"""One distillation pretraining step of ours vs one FP training step of transformers' BertForPreTraining.

Ours: frozen FP teacher forward + binary student forward/backward (MLM decoder at the masked
positions only) + AdamW, jitted, as `bipft pretrain` runs it. Peer: PyTorch BertForPreTraining of
the same size, full precision, student alone (forward with MLM and NSP labels, backward, AdamW).
Both on random weights and tokens (the time does not depend on them), measured in the same run;
the medians of `--repeats` steps after `--warmup` untimed ones (compilation excluded).

  PYTHONPATH=. python bench/pretrain_step.py --size base --batch 8 --length 128 --repeats 3

The last line is `RESULT {json}` with ours_s, peer_s and speedup (peer_s / ours_s).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bipft_jax import config_loading, sharding, train  # noqa: E402
from bipft_jax import model as model_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(batch: int, length: int, vocab: int, max_predictions: int, seed: int = 0) -> dict:
  """Full-length pairs with 15% of positions masked, as the data pipeline produces them."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, (batch, length)).astype(np.int32)
  positions = np.sort(np.stack([rng.choice(np.arange(1, length - 1), max_predictions, replace=False)
                                for _ in range(batch)]), axis=1).astype(np.int32)
  labels = np.full((batch, length), -100, np.int32)
  np.put_along_axis(labels, positions, np.take_along_axis(ids, positions, 1), 1)
  return {"input_ids": ids, "token_type_ids": (np.arange(length) >= length // 2).astype(np.int32)[None].repeat(batch, 0),
          "attention_mask": np.ones((batch, length), np.int32), "labels": labels,
          "mlm_positions": positions, "mlm_labels": np.take_along_axis(ids, positions, 1),
          "next_sentence_label": rng.integers(0, 2, batch).astype(np.int32)}


def median_seconds(step, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def ours(args, batch: dict) -> float:
  config = config_loading.load_config(os.path.join(REPO, "configs", "pretrain.py") + ":base")
  config.model = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size},binary")
  config.batch_size, config.eval_batch_size = args.batch, args.batch
  config.data.max_seq_length, config.data.max_predictions = args.length, batch["mlm_positions"].shape[1]
  config.loss.nsp_distill = True  # a BERT teacher with its NSP head, as in the paper
  student_config = train.student_config(config)
  teacher_config = dataclasses.replace(student_config, binary=False, mlm_transform_act="gelu")
  trainer = train.make_trainer(config, teacher_config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  teacher_params = jax.device_put(model_lib.init_params(trainer.teacher, jax.random.key(1)),
                                  trainer.teacher_shardings)
  global_batch = train.global_batch(batch, trainer.batch_sharding)
  state = [trainer.init_state(teacher_params, global_batch)]

  def step():
    state[0], metrics = trainer.train_step(state[0], teacher_params, global_batch, 0)
    jax.block_until_ready(metrics["total_loss"])

  return median_seconds(step, args.warmup, args.repeats)


def peer(args, batch: dict) -> float:
  import torch
  import transformers
  size = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size}")
  hf_config = transformers.BertConfig(
      vocab_size=size.vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
      num_attention_heads=size.num_heads, intermediate_size=size.intermediate_size,
      max_position_embeddings=size.max_position_embeddings, attn_implementation="eager")
  model = transformers.BertForPreTraining(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
  inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "token_type_ids", "attention_mask", "labels",
                                                          "next_sentence_label")}

  def step():
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return median_seconds(step, args.warmup, args.repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="base", help="a size of configs/model.py (tiny, mini, small, base...)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()
  size = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size}")
  batch = synthetic_batch(args.batch, args.length, size.vocab_size, max(1, round(0.15 * args.length)))
  ours_s = ours(args, batch)
  print(f"ours (teacher forward + binary student step + AdamW): median {ours_s:.3f} s", flush=True)
  peer_s = peer(args, batch)
  print(f"peer (transformers BertForPreTraining FP step + AdamW): median {peer_s:.3f} s", flush=True)
  print("RESULT " + json.dumps({"ours_s": round(ours_s, 4), "peer_s": round(peer_s, 4),
                                "speedup": round(peer_s / ours_s, 3), "size": args.size, "batch": args.batch,
                                "length": args.length, "repeats": args.repeats}))


if __name__ == "__main__":
  main()
