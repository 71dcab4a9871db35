"""Batches of pretraining examples: deterministic, split over hosts, with a state to checkpoint.

Each host reads its own documents (`process_index::process_count`, disjoint), visits them in an
order shuffled per epoch, and cuts every document into examples with a generator seeded by
(seed, epoch, document). With `masking="dynamic"` (the default, as RoBERTa) pairs and masks are
drawn anew every epoch; with "static" they are the same in every epoch (BERT's single
duplication). A random next segment reads a few sentences of a random document, tokenized as read
(the document may be a book). The iterator's state, {epoch, position, offset}, is a small JSON
dict: restoring it continues with exactly the batches an uninterrupted run would have produced.
"""
import collections
import functools
from typing import Iterator, Sequence

import numpy as np

from bipft_jax.data import examples as examples_lib
from bipft_jax.data.sources import sentence_spans
from bipft_jax.errors import UserError

MASKING = ("dynamic", "static")
SPANS_BUDGET = 512 << 20  # bytes of sentence spans kept per host: every book of BooksCorpus (about 24 KB each)


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
    self.tokenizer = tokenizer
    self.spans = _SpanCache(SPANS_BUDGET)
    self.document_examples = functools.lru_cache(maxsize=2)(self._document_examples)
    # Drawn once an epoch: a permutation of a host's documents per example took 290 ms at Wikipedia's
    # 6M articles (a 1.2M-document corpus gave 35 examples/s instead of about 1,300).
    self.order = functools.lru_cache(maxsize=1)(self._order)
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

  def _sentences(self, document: int) -> "_SentencesOnDemand":
    text = self.source[document]
    return _SentencesOnDemand(text, self.spans.get(document, text), self.tokenizer)

  def _document_examples(self, epoch: int, document: int) -> list:
    """Every example of one document in one epoch (a pure function of seed, epoch and document)."""
    draw = epoch if self.config.masking == "dynamic" else 0
    rng = np.random.default_rng([self.seed, draw, document])

    def random_document():
      for _ in range(10):  # as BERT: another document, unless the corpus has only this one
        other = int(rng.integers(0, len(self.source)))
        if other != document:
          break
      return self._sentences(other)

    cfg = self.config
    pairs = examples_lib.segment_pairs(self._sentences(document).all(), random_document, cfg.max_seq_length - 3,
                                       cfg.short_seq_prob, rng)
    return [examples_lib.masked_example(a, b, is_random, self.special, cfg.max_seq_length,
                                        cfg.max_predictions, cfg.mask_prob, rng) for a, b, is_random in pairs]

  def _next_example(self) -> dict:
    empty_documents = 0
    while True:
      order = self.order(self.epoch)
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


class _SentencesOnDemand(Sequence):
  """A document's sentences (by `sentence_spans`), each tokenized when read. A random next segment reads
  a few sentences of another document, which may be a whole book: tokenizing all of it for them made
  a corpus of books yield about 10 examples a second."""

  def __init__(self, text: str, spans: np.ndarray, tokenizer):
    self.text, self.spans, self.tokenizer = text, spans, tokenizer

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> list:
    start, end = self.spans[i]
    return self.tokenizer(self.text[start:end], add_special_tokens=False)["input_ids"]

  def all(self) -> list:
    """Every sentence's WordPiece ids (no special tokens), those of no tokens left out."""
    sentences = [self.text[start:end] for start, end in self.spans.tolist()]
    if not sentences:
      return []
    return [ids for ids in self.tokenizer(sentences, add_special_tokens=False)["input_ids"] if ids]


class _SpanCache:
  """`sentence_spans` of the documents last read, up to `budget` bytes (splitting a book into sentences
  takes about 20 ms; its spans 24 KB)."""

  def __init__(self, budget: int):
    self.budget, self.size, self.items = budget, 0, collections.OrderedDict()

  def get(self, document: int, text: str) -> np.ndarray:
    spans = self.items.pop(document, None)
    if spans is None:
      spans = sentence_spans(text)
      self.size += spans.nbytes
    self.items[document] = spans
    while self.size > self.budget and len(self.items) > 1:
      self.size -= self.items.popitem(last=False)[1].nbytes
    return spans


def fixed_batches(source: Sequence, tokenizer, data_config, *, batch_size: int, num_batches: int,
                  seed: int, process_index: int = 0, process_count: int = 1) -> list:
  """The same `num_batches` statically masked batches on every call: a held-out evaluation set."""
  eval_config = data_config.copy_and_resolve_references()
  eval_config.masking = "static"
  data = PretrainingData(source, tokenizer, eval_config, batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
  return [next(data) for _ in range(num_batches)]
