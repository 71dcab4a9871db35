"""Batches of pretraining examples: deterministic, split over hosts, with a state to checkpoint.

Each host reads its own documents (`process_index::process_count`, disjoint), visits them in an
order shuffled per epoch, and cuts every document into examples with a generator seeded by
(seed, epoch, document). With `masking="dynamic"` (the default, as RoBERTa) pairs and masks are
drawn anew every epoch; with "static" they are the same in every epoch (BERT's single
duplication). A random next segment reads a few sentences of a random document, tokenized as read
(the document may be a book). The iterator's state, {epoch, position, offset}, is a small JSON
dict: restoring it continues with exactly the batches an uninterrupted run would have produced.
Documents' examples are made in the data thread or, ahead of it, by worker processes (`workers.py`):
the same batches either way.
"""
import collections
import functools
from typing import Iterator, Optional, Sequence

import numpy as np
import tokenizers

from bipft_jax.data import examples as examples_lib
from bipft_jax.data.sources import sentence_spans
from bipft_jax.errors import UserError

MASKING = ("dynamic", "static")
SPANS_BUDGET = 512 << 20  # bytes of sentence spans a process keeps: every book of BooksCorpus (about 24 KB each)


class PretrainingData(Iterator):
  """Iterates over per-host batches (dicts of numpy arrays with leading axis `batch_size`).

  With `pool` (`workers.ExamplePool`), worker processes make the documents ahead of the stream (its
  `pool_source`-th source is this `source`). `spans`: a `SpanCache` shared with the process's other
  streams (a host's shards), so that the process keeps SPANS_BUDGET in all; None: one of its own."""

  def __init__(self, source: Sequence, tokenizer, data_config, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, pool=None, pool_source: int = 0,
               spans: Optional["SpanCache"] = None):
    if data_config.masking not in MASKING:
      raise UserError(f"unknown data.masking {data_config.masking!r}; choose one of {', '.join(MASKING)}")
    if data_config.max_seq_length < 8 or data_config.max_seq_length > 512:
      raise UserError(f"data.max_seq_length must be in [8, 512], got {data_config.max_seq_length}")
    self.source, self.config, self.batch_size, self.seed = source, data_config, batch_size, seed
    self.special = examples_lib.SpecialTokens.from_tokenizer(tokenizer)
    self.word_continuations = (examples_lib.word_continuations(tokenizer) if data_config.whole_word_masking
                               else None)
    self.documents = np.arange(process_index, len(source), process_count)
    if not len(self.documents):
      raise UserError(f"data shard {process_index} of {process_count} gets no documents: the source has only "
                      f"{len(source)} (lower data.shards)")
    self.encoder = _sentence_encoder(tokenizer)
    self.spans = spans or SpanCache(SPANS_BUDGET)
    # Drawn once an epoch: a permutation of a host's documents per example took 290 ms at Wikipedia's
    # 6M articles (a 1.2M-document corpus gave 35 examples/s instead of about 1,300). Two: the pool
    # works ahead into the next epoch.
    self.order = functools.lru_cache(maxsize=2)(self._order)
    self.pool, self.pool_source = pool, pool_source
    self.ahead = collections.deque()  # (epoch, first position, future) of chunks being made
    self.next_chunk = (0, 0)  # (epoch, position) where the next chunk to make starts
    self.made = None  # (epoch, first position, [examples of each document]) of the chunk being read
    self.examples_made, self.documents_made = 0, 0  # sizing the chunks
    self.epoch, self.position, self.offset = 0, 0, 0

  def state(self) -> dict:
    """Where the iterator is; `restore(state)` continues from here."""
    return {"epoch": self.epoch, "position": self.position, "offset": self.offset, "seed": self.seed,
            "num_documents": len(self.documents)}

  def restore(self, state: dict) -> None:
    if state.get("seed") != self.seed or state.get("num_documents") != len(self.documents):
      raise UserError(f"the checkpoint's data position is in {state.get('num_documents')} documents of a shard "
                      f"(seed {state.get('seed')}), where this run's shard has {len(self.documents)} (seed "
                      f"{self.seed}): the training data, data.shards, data.shard_by or the seed changed; resume "
                      "with the run's, or start a new workdir from the checkpoint with --init_from")
    self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.documents)

  def _sentences(self, document: int) -> "_SentencesOnDemand":
    text = self.source[document]
    return _SentencesOnDemand(text, self.spans.get((id(self.source), document), text), self.encoder)

  def document_examples(self, epoch: int, document: int) -> Optional[dict]:
    """Every example of one document in one epoch, stacked (None if it has none): a pure function of
    seed, epoch and document."""
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
    examples = [examples_lib.masked_example(a, b, is_random, self.special, cfg.max_seq_length,
                                            cfg.max_predictions, cfg.mask_prob, rng, self.word_continuations)
                for a, b, is_random in pairs]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]} if examples else None

  def _examples_at(self, epoch: int, position: int) -> Optional[dict]:
    """The examples of the document at `position` of `epoch`'s order."""
    made = self.made
    if made and made[0] == epoch and made[1] <= position < made[1] + len(made[2]):
      return made[2][position - made[1]]
    if self.pool is None:
      self.made = (epoch, position, [self.document_examples(epoch, int(self.order(epoch)[position]))])
      return self.made[2][0]
    if not (self.ahead and self.ahead[0][:2] == (epoch, position)):  # the first read, or a restore
      for chunk in self.ahead:
        chunk[2].cancel()
      self.ahead.clear()
      self.next_chunk = (epoch, position)
    self._make_ahead()
    _, _, future = self.ahead.popleft()
    self._make_ahead()
    made = self.pool.result(future)
    self.examples_made += sum(len(e["input_ids"]) for e in made if e is not None)
    self.documents_made += len(made)
    self.made = (epoch, position, made)
    return made[0]

  def _make_ahead(self) -> None:
    """Keeps two chunks a worker in the making, each of about a batch of examples (one book, or dozens
    of short articles; one document until some are made), so that the examples waiting stay a few
    batches whatever the documents."""
    size = 1
    if self.examples_made:
      size = int(np.clip(self.batch_size * self.documents_made / self.examples_made, 1, 64))
    while len(self.ahead) < 2 * self.pool.workers:
      epoch, first = self.next_chunk
      order = self.order(epoch)
      documents = order[first:first + size]
      self.ahead.append((epoch, first, self.pool.submit(epoch, documents, self.pool_source)))
      end = first + len(documents)
      self.next_chunk = (epoch, end) if end < len(order) else (epoch + 1, 0)

  def __next__(self) -> dict:
    parts, wanted, empty_documents = [], self.batch_size, 0
    while wanted:
      examples = self._examples_at(self.epoch, self.position)
      available = 0 if examples is None else len(examples["input_ids"]) - self.offset
      if available > 0:
        take = min(wanted, available)
        parts.append({key: value[self.offset:self.offset + take] for key, value in examples.items()})
        self.offset, wanted = self.offset + take, wanted - take
        continue
      empty_documents = empty_documents + 1 if examples is None else 0
      if empty_documents > len(self.documents):
        raise UserError("the data source yields no examples: its documents have no sentence pairs")
      self.position, self.offset = self.position + 1, 0
      if self.position == len(self.documents):
        self.epoch, self.position = self.epoch + 1, 0
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


class _SentencesOnDemand(Sequence):
  """A document's sentences (by `sentence_spans`), each tokenized when read. A random next segment reads
  a few sentences of another document, which may be a whole book: tokenizing all of it for them made
  a corpus of books yield about 10 examples a second."""

  def __init__(self, text: str, spans: np.ndarray, encoder):
    self.text, self.spans, self.encoder = text, spans, encoder

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> list:
    start, end = self.spans[i]
    return self.encoder.encode(self.text[start:end], add_special_tokens=False).ids

  def all(self) -> list:
    """Every sentence's WordPiece ids (no special tokens), those of no tokens left out."""
    encoded = (self.encoder.encode(self.text[start:end], add_special_tokens=False).ids
               for start, end in self.spans.tolist())
    return [ids for ids in encoded if ids]


def _sentence_encoder(tokenizer):
  """The transformers tokenizer's Rust tokenizer, called one sentence at a time: through transformers,
  even one sentence went through the parallel batch encoder, whose threads cost more than short
  sentences' tokenizing (1.15-2x the examples a second without it, the same ids). A copy, without the
  truncation and padding its tokenizer.json may set (MiniLM's pads to 128; transformers clears them
  on each of its calls)."""
  encoder = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
  encoder.no_truncation()
  encoder.no_padding()
  return encoder


class SpanCache:
  """`sentence_spans` of the documents last read, up to `budget` bytes (splitting a book into sentences
  takes about 7 ms; its spans 24 KB), by (id of the source, document)."""

  def __init__(self, budget: int):
    self.budget, self.size, self.items = budget, 0, collections.OrderedDict()

  def get(self, key: tuple, text: str) -> np.ndarray:
    spans = self.items.pop(key, None)
    if spans is None:
      spans = sentence_spans(text)
      self.size += spans.nbytes
    self.items[key] = spans
    while self.size > self.budget and len(self.items) > 1:
      self.size -= self.items.popitem(last=False)[1].nbytes
    return spans


def fixed_batches(source: Sequence, tokenizer, data_config, *, batch_size: int, num_batches: int,
                  seed: int, process_index: int = 0, process_count: int = 1) -> tuple:
  """(the same `num_batches` statically masked batches on every call: a held-out evaluation set, whether
  they hold an example twice: the source ran out and its second epoch began)."""
  eval_config = data_config.copy_and_resolve_references()
  eval_config.masking = "static"
  data = PretrainingData(source, tokenizer, eval_config, batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
  return [next(data) for _ in range(num_batches)], data.epoch > 0
