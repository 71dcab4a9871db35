"""Batches of pretraining examples: deterministic, split over hosts, with a state to checkpoint.

Each host reads its own documents (`process_index::process_count`, disjoint), visits them in an
order shuffled per epoch, and cuts every document into examples with a generator seeded by
(seed, epoch, document). With `masking="dynamic"` (the default, as RoBERTa) pairs and masks are
drawn anew every epoch; with "static" they are the same in every epoch (BERT's single
duplication). The iterator's state, {epoch, position, offset}, is a small JSON dict: restoring it
continues with exactly the batches an uninterrupted run would have produced.
"""
import functools
from typing import Iterator, Sequence

import numpy as np

from bipft_jax.data import examples as examples_lib
from bipft_jax.data.sources import split_sentences
from bipft_jax.errors import UserError

MASKING = ("dynamic", "static")


class PretrainingData(Iterator):
  """Iterates over per-host batches (dicts of numpy arrays with leading axis `batch_size`)."""

  def __init__(self, source: Sequence, tokenizer, data_config, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if data_config.masking not in MASKING:
      raise UserError(f"unknown data.masking {data_config.masking!r}; choose one of {', '.join(MASKING)}")
    if data_config.max_seq_length < 8 or data_config.max_seq_length > 512:
      raise UserError(f"data.max_seq_length must be in [8, 512], got {data_config.max_seq_length}")
    self.source, self.config, self.batch_size, self.seed = source, data_config, batch_size, seed
    self.special = examples_lib.SpecialTokens.from_tokenizer(tokenizer)
    self.documents = np.arange(process_index, len(source), process_count)
    if not len(self.documents):
      raise UserError(f"host {process_index} of {process_count} gets no documents: the source has only "
                      f"{len(source)}")
    self.tokenized = functools.lru_cache(maxsize=8192)(functools.partial(_tokenize, source, tokenizer))
    self.document_examples = functools.lru_cache(maxsize=2)(self._document_examples)
    self.epoch, self.position, self.offset = 0, 0, 0

  def state(self) -> dict:
    """Where the iterator is; `restore(state)` continues from here."""
    return {"epoch": self.epoch, "position": self.position, "offset": self.offset, "seed": self.seed,
            "num_documents": len(self.documents)}

  def restore(self, state: dict) -> None:
    if state.get("seed") != self.seed or state.get("num_documents") != len(self.documents):
      raise UserError(f"the checkpointed data state {state} belongs to a different seed or corpus "
                      f"(seed {self.seed}, {len(self.documents)} documents here)")
    self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.documents)

  def _document_examples(self, epoch: int, document: int) -> list:
    """Every example of one document in one epoch (a pure function of seed, epoch and document)."""
    draw = epoch if self.config.masking == "dynamic" else 0
    rng = np.random.default_rng([self.seed, draw, document])

    def random_document():
      for _ in range(10):  # as BERT: another document, unless the corpus has only this one
        other = int(rng.integers(0, len(self.source)))
        if other != document:
          break
      return self.tokenized(other)

    cfg = self.config
    pairs = examples_lib.segment_pairs(self.tokenized(document), random_document, cfg.max_seq_length - 3,
                                       cfg.short_seq_prob, rng)
    return [examples_lib.masked_example(a, b, is_random, self.special, cfg.max_seq_length,
                                        cfg.max_predictions, cfg.mask_prob, rng) for a, b, is_random in pairs]

  def _next_example(self) -> dict:
    empty_documents = 0
    while True:
      order = self._order(self.epoch)
      examples = self.document_examples(self.epoch, int(order[self.position]))
      if self.offset < len(examples):
        self.offset += 1
        return examples[self.offset - 1]
      empty_documents = empty_documents + 1 if not examples else 0
      if empty_documents > len(self.documents):
        raise UserError("the data source yields no examples: its documents have no sentence pairs")
      self.position, self.offset = self.position + 1, 0
      if self.position == len(order):
        self.epoch, self.position = self.epoch + 1, 0

  def __next__(self) -> dict:
    batch = [self._next_example() for _ in range(self.batch_size)]
    return {key: np.stack([example[key] for example in batch]) for key in batch[0]}


def _tokenize(source: Sequence, tokenizer, document: int) -> list:
  """A document as a list of tokenized sentences (WordPiece ids, no special tokens)."""
  sentences = split_sentences(source[document])
  if not sentences:
    return []
  return [ids for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"] if ids]


def fixed_batches(source: Sequence, tokenizer, data_config, *, batch_size: int, num_batches: int,
                  seed: int, process_index: int = 0, process_count: int = 1) -> list:
  """The same `num_batches` statically masked batches on every call: a held-out evaluation set."""
  eval_config = data_config.copy_and_resolve_references()
  eval_config.masking = "static"
  data = PretrainingData(source, tokenizer, eval_config, batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
  return [next(data) for _ in range(num_batches)]
