"""The pretraining pipeline: masking and NSP statistics, determinism, resumable state, host split, workers
(the sources of its documents: test_sources.py)."""
import copy
import gzip
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from bipft_jax import pytorch_io
from bipft_jax.data import examples, hosts, pipeline, sources
from bipft_jax.errors import HostFailed, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOCS = 40
WORDS = [f"w{i}" for i in range(60)]


def write_corpus(directory, num_docs=NUM_DOCS, seed=0) -> str:
  """Documents of 6-12 sentences; every sentence names its document (`dN`), one sentence a line."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(num_docs):
    sentences = [" ".join(["The", f"d{d}"] + list(rng.choice(WORDS, rng.integers(3, 12)))) + "."
                 for _ in range(rng.integers(6, 13))]
    docs.append("\n".join(sentences))
  path = directory / "corpus.txt"
  path.write_text("\n\n".join(docs) + "\n")
  return str(path)


def gzipped(path: str) -> str:
  """A .gz copy of the file `path`, beside it."""
  with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
    g.write(f.read())
  return path + ".gz"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "."] + WORDS + [f"d{i}" for i in range(NUM_DOCS)]
  directory = tmp_path_factory.mktemp("vocab")
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return pytorch_io.load_tokenizer(str(directory))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return sources.TextFiles([write_corpus(tmp_path_factory.mktemp("corpus"))])


def data_config(**overrides):
  c = ml_collections.ConfigDict(dict(max_seq_length=32, max_predictions=5, mask_prob=0.15, short_seq_prob=0.1,
                                     masking="dynamic", whole_word_masking=False))
  c.update(overrides)
  return c


def batches(corpus, tokenizer, n, **kwargs):
  kwargs.setdefault("seed", 0)
  data = pipeline.PretrainingData(corpus, tokenizer, kwargs.pop("config", data_config()), batch_size=16, **kwargs)
  return [next(data) for _ in range(n)]


def stacked(batch_list):
  return {k: np.concatenate([b[k] for b in batch_list]) for k in batch_list[0]}


def doc_markers(tokenizer, ids, types, mask, segment):
  """The document numbers named in one segment of one example (original tokens)."""
  tokens = tokenizer.convert_ids_to_tokens(ids[(types == segment) & (mask == 1)])
  return {int(t[1:]) for t in tokens if t.startswith("d") and t[1:].isdigit()}


def test_masking_statistics(corpus, tokenizer):
  b = stacked(batches(corpus, tokenizer, 40))
  special = examples.SpecialTokens.from_tokenizer(tokenizer)
  masked = b["labels"] != examples.IGNORE_INDEX
  lengths = b["attention_mask"].sum(1)
  assert (lengths <= 32).all() and (lengths == 32).mean() > 0.5  # most pairs fill the target length
  expected = np.minimum(5, np.maximum(1, np.round(lengths * 0.15)))
  np.testing.assert_array_equal(masked.sum(1), expected)
  original = np.where(masked, b["labels"], b["input_ids"])
  assert not np.isin(original[masked], [special.cls_id, special.sep_id, special.pad_id, special.mask_id]).any()
  assert not np.isin(original, [special.mask_id]).any()  # every [MASK] has its label
  inputs = b["input_ids"][masked]
  as_mask, unchanged = np.mean(inputs == special.mask_id), np.mean(inputs == original[masked])
  assert 0.75 < as_mask < 0.85 and 0.06 < unchanged < 0.15 and 0.05 < 1 - as_mask - unchanged < 0.15
  assert 0.14 < masked.sum() / lengths.sum() < 0.16  # BERT: 15% of all tokens, [CLS]/[SEP] counted
  # the gathered targets agree with the full label array
  np.testing.assert_array_equal(np.take_along_axis(b["labels"], b["mlm_positions"], 1)[b["mlm_labels"] != -100],
                                b["labels"][masked])
  assert ((b["mlm_labels"] != -100).sum(1) == masked.sum(1)).all()


def test_nsp_pairs(corpus, tokenizer):
  b = stacked(batches(corpus, tokenizer, 40))
  assert 0.4 < b["next_sentence_label"].mean() < 0.62
  original = np.where(b["labels"] != -100, b["labels"], b["input_ids"])
  checked = 0
  for ids, types, mask, is_random in zip(original, b["token_type_ids"], b["attention_mask"],
                                         b["next_sentence_label"]):
    a_docs = doc_markers(tokenizer, ids, types, mask, 0)
    b_docs = doc_markers(tokenizer, ids, types, mask, 1)
    assert len(a_docs) <= 1 and len(b_docs) <= 1  # each segment comes from one document
    if a_docs and b_docs:  # (truncation can cut a marker off)
      assert (a_docs == b_docs) != bool(is_random)
      checked += 1
  assert checked > 0.8 * len(original)


def test_same_seed_same_batches_and_resume(corpus, tokenizer):
  first, again = batches(corpus, tokenizer, 5), batches(corpus, tokenizer, 5)
  for x, y in zip(first, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = batches(corpus, tokenizer, 1, seed=1)
  assert not np.array_equal(other[0]["input_ids"], first[0]["input_ids"])

  data = pipeline.PretrainingData(corpus, tokenizer, data_config(), batch_size=16, seed=0)
  for _ in range(3):
    next(data)
  state = dict(data.state())
  resumed = pipeline.PretrainingData(corpus, tokenizer, data_config(), batch_size=16, seed=0)
  resumed.restore(state)
  for expected in first[3:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])
  with pytest.raises(UserError, match=rf"data position is in {len(corpus)} documents of a shard \(seed 0\), where "
                                      rf"this run's shard has {len(corpus)} \(seed 5\): the training data, data.shards, "
                                      "data.shard_by or the seed changed; resume with the run's, or start a new workdir "
                                      "from the checkpoint with --init_from"):
    pipeline.PretrainingData(corpus, tokenizer, data_config(), batch_size=16, seed=5).restore(state)


def test_document_order_drawn_once_an_epoch(corpus, tokenizer, monkeypatch):
  # It was drawn for every example: at Wikipedia's millions of documents, 290 ms an example.
  drawn, draw = [], pipeline.PretrainingData._order
  monkeypatch.setattr(pipeline.PretrainingData, "_order", lambda self, epoch: drawn.append(epoch) or draw(self, epoch))
  data = pipeline.PretrainingData(corpus, tokenizer, data_config(), batch_size=16, seed=0)
  for _ in range(20):
    next(data)
  assert data.state()["epoch"] >= 1
  assert drawn == list(range(data.state()["epoch"] + 1))


def test_worker_processes_make_the_same_batches(tmp_path, tokenizer):
  # A plain and a .gz file: the decompressed one reaches the workers as an open file (it has no name).
  plain = write_corpus(tmp_path)
  (tmp_path / "more").mkdir()
  corpus = sources.TextFiles([plain, gzipped(write_corpus(tmp_path / "more", num_docs=30, seed=1))])

  def host_data(workers):
    return hosts.HostData(corpus, tokenizer, data_config(shards=2, workers=workers), global_batch_size=16, seed=0)

  in_thread, pooled = host_data(0), host_data(2)
  expected = [next(in_thread) for _ in range(40)]  # several epochs of both shards
  got, state = [], None
  for i in range(40):
    got.append(next(pooled))
    state = pooled.state() if i == 12 else state
  assert len(multiprocessing.active_children()) == 2
  pooled.close()
  resumed = host_data(2)
  resumed.restore(state)
  got += [next(resumed) for _ in range(5)]
  resumed.close()
  assert in_thread.state()["shards"][0]["epoch"] >= 2 and in_thread.pool is None
  for x, y in zip(expected + expected[13:18], got):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not multiprocessing.active_children()


def test_sharded_by_files_a_host_opens_its_shards_files_alone(tmp_path, tokenizer, monkeypatch):
  # Six files (one .gz) dealt to 4 shards, 2 hosts: host 1 (shards 2, 3) must open files 2 and 3 only,
  # and put into the global batch what one host reading all 4 shards puts in its rows 8-15.
  paths = []
  for i in range(6):
    (tmp_path / f"f{i}").mkdir()
    paths.append(write_corpus(tmp_path / f"f{i}", num_docs=4 + i, seed=i))
  paths[4] = gzipped(paths[4])
  os.remove(paths[4][:-len(".gz")])
  config = data_config(source="text", paths=str(tmp_path / "f*" / "corpus.txt*"), text_field="text", shards=4,
                       shard_by="files")
  opened, file_contents = [], sources._file_contents
  monkeypatch.setattr(sources, "_file_contents", lambda path: opened.append(path) or file_contents(path))

  def host_data(workers=0):
    return hosts.HostData(hosts.training_source(config), tokenizer, data_config(**config, workers=workers),
                          global_batch_size=16, seed=0)

  whole = host_data()
  assert sorted(opened) == paths
  expected = [next(whole) for _ in range(12)]  # epochs of every shard (4-9 documents each)
  # The shards' streams keep one SpanCache (one budget for the process), their documents apart by source.
  spans = whole.streams[0].spans
  assert all(stream.spans is spans for stream in whole.streams)
  assert {source for source, _ in spans.items} == {id(source) for source in whole.sources}
  assert [s["num_documents"] for s in whole.state()["shards"]] == [4 + 8, 5 + 9, 6, 7]
  assert whole.describe_file_shards(6) == [
      "data.shard_by=files: 6 files in 4 shards of 6-14 documents (39 in all)",
      "warning: the documents of the smallest data shard come round 2.3x as often as the largest's (every shard "
      "gives a batch as many rows): give the shards files of about equal size, or set data.shard_by=documents"]
  by_documents = hosts.HostData(sources.TextFiles(paths), tokenizer, data_config(shards=4), global_batch_size=16,
                                seed=0).state()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(hosts.multihost_utils, "process_allgather", lambda mine: np.stack([mine, mine]))  # host 0 alike
  opened.clear()
  host1, pooled = host_data(), host_data(workers=1)
  assert opened == paths[2:4] * 2
  for want in expected:
    got, got_pooled = next(host1), next(pooled)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key][8:])
      np.testing.assert_array_equal(got_pooled[key], want[key][8:])
  pooled.close()
  unmasked = [np.where(b["labels"] >= 0, b["labels"], b["input_ids"])[8:12] for b in expected]  # shard 2's rows
  documents = {int(d[1:]) for rows in unmasked for row in rows for d in tokenizer.convert_ids_to_tokens(row)
               if re.fullmatch(r"d\d+", d)}
  assert documents == set(range(6))  # file 2's documents, d0-d5, random next segments too
  with pytest.raises(UserError, match="the training data, data.shards, data.shard_by or the seed changed"):
    host_data().restore(by_documents)


@pytest.mark.parametrize("shard_by", ["documents", "files"])
def test_hosts_that_see_other_training_files_stop_in_one_line(tmp_path, monkeypatch, shard_by):
  # Host 1 of 2 sees the corpus with a file more, or a file under another name (a copy under way, a
  # stale mount): caught before training, on every host (each compares the same gathered rows).
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    write_corpus(tmp_path / name, num_docs=5)
  config = data_config(source="text", paths=str(tmp_path / "*" / "corpus.txt"), text_field="text",
                       shards=2, shard_by=shard_by)
  host_1 = lambda: np.array(hosts._seen(sources.open_source(config, "train")))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = [host_1()]
  monkeypatch.setattr(hosts.multihost_utils, "process_allgather", lambda mine: np.stack([mine, seen[0]]))
  assert hosts.training_source(config) is not None  # host 1 sees what host 0 sees
  (tmp_path / "c").mkdir()
  write_corpus(tmp_path / "c", num_docs=5)
  seen[0] = host_1()
  shutil.rmtree(tmp_path / "c")
  documents = "" if shard_by == "files" else f", {len(sources.open_source(config, 'train'))} documents"
  with pytest.raises(UserError, match=re.escape("host 1 sees other training data than host 0 (3 files, ")):
    hosts.training_source(config)
  os.rename(tmp_path / "b", tmp_path / "b_copy")
  seen[0] = host_1()
  os.rename(tmp_path / "b_copy", tmp_path / "b")
  with pytest.raises(UserError, match=f"bytes{documents}; other file names or sizes\\): every host must see the same"):
    hosts.training_source(config)


def test_a_killed_worker_stops_the_data_in_one_line(corpus, tokenizer):
  data = hosts.HostData(corpus, tokenizer, data_config(shards=0, workers=1), global_batch_size=16, seed=0)
  next(data)
  (worker,) = multiprocessing.active_children()
  os.kill(worker.pid, signal.SIGKILL)  # the out-of-memory killer, say
  with pytest.raises(HostFailed, match="a data worker process ended abruptly .* rerun the same command to resume"):
    for _ in range(1000):  # the examples made before the kill are still taken
      next(data)
  data.close()


_ORPHANED_WORKERS = textwrap.dedent("""
  import json, multiprocessing, os, signal, sys, time
  import ml_collections
  from bipft_jax import pytorch_io
  from bipft_jax.data import hosts, sources
  if __name__ == "__main__":
    corpus, vocab, config = sys.argv[1:]
    data = hosts.HostData(sources.TextFiles([corpus]), pytorch_io.load_tokenizer(vocab),
                          ml_collections.ConfigDict(json.loads(config)), global_batch_size=16, seed=0)
    next(data)
    workers = multiprocessing.active_children()
    for worker in workers:
      os.kill(worker.pid, signal.SIGINT)  # a Ctrl-C reaches the whole process group; the run handles it
    time.sleep(1)
    for _ in range(20):
      next(data)
    print(*(worker.pid for worker in workers if worker.is_alive()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_worker_processes_ignore_ctrl_c_and_leave_with_their_parent(tmp_path, tokenizer):
  corpus = write_corpus(tmp_path)
  vocab = tmp_path / "vocab"
  tokenizer.save_pretrained(str(vocab))
  config = data_config(shards=0, workers=2).to_json()
  run = subprocess.run([sys.executable, "-c", _ORPHANED_WORKERS, corpus, str(vocab), config], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
  workers = [int(pid) for pid in run.stdout.split()]
  assert len(workers) == 2 and "KeyboardInterrupt" not in run.stderr
  deadline = time.time() + 10
  while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
    time.sleep(0.2)
  assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "orphaned data workers"


def test_hosts_read_disjoint_documents(corpus, tokenizer):
  seen = []
  for host in range(2):
    b = stacked(batches(corpus, tokenizer, 10, process_index=host, process_count=2))
    seen.append(set().union(*(doc_markers(tokenizer, i, t, m, 0) for i, t, m in
                              zip(np.where(b["labels"] != -100, b["labels"], b["input_ids"]),
                                  b["token_type_ids"], b["attention_mask"]))))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert {d % 2 for d in seen[0]} == {0} and {d % 2 for d in seen[1]} == {1}


PIECES = ["", "a", "bc", "abc"]  # a word's suffix, split by WordPiece into "##a", "##b", "##c"


def words_of(ids, continues, candidate):
  """The positions of each word of one example: a "##" piece joins the candidate token before it."""
  words = []
  for i in np.flatnonzero(candidate):
    if continues[ids[i]] and candidate[i - 1]:
      words[-1].append(i)
    else:
      words.append([i])
  return words


def test_whole_word_masking_masks_all_of_a_words_pieces_or_none(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", ".", "##a", "##b", "##c"] + WORDS
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = pytorch_io.load_tokenizer(str(tmp_path))
  rng = np.random.default_rng(1)
  documents = ["\n".join(" ".join(w + PIECES[rng.integers(4)] for w in rng.choice(WORDS, rng.integers(3, 12))) + "."
                         for _ in range(rng.integers(6, 13))) for _ in range(40)]
  (tmp_path / "corpus.txt").write_text("\n\n".join(documents) + "\n")
  corpus = sources.TextFiles([str(tmp_path / "corpus.txt")])
  continues = examples.word_continuations(tokenizer)
  assert sorted(tokenizer.convert_ids_to_tokens(np.flatnonzero(continues).tolist())) == ["##a", "##b", "##c"]
  special = examples.SpecialTokens.from_tokenizer(tokenizer)
  split_words = {}
  for whole in (True, False):
    b = stacked(batches(corpus, tokenizer, 40, config=data_config(whole_word_masking=whole)))
    masked = b["labels"] != examples.IGNORE_INDEX
    original = np.where(masked, b["labels"], b["input_ids"])
    split_words[whole] = masked_words = 0
    for ids, targets, mask in zip(original, masked, b["attention_mask"]):
      candidate = (mask == 1) & ~np.isin(ids, [special.cls_id, special.sep_id])
      for word in words_of(ids, continues, candidate):
        split_words[whole] += 0 < targets[word].sum() < len(word)
        masked_words += len(word) > 1 and targets[word].all()
    if whole:
      assert masked_words > 100  # words of several pieces are masked, whole
      lengths = b["attention_mask"].sum(1)
      expected = np.minimum(5, np.maximum(1, np.round(lengths * 0.15)))
      # a word that would overshoot the budget is skipped for a shorter one: at most 3 short (4 pieces)
      assert (masked.sum(1) <= expected).all() and (masked.sum(1) >= expected - 3).all()
      assert 0.13 < masked.sum() / lengths.sum() < 0.16
      inputs = b["input_ids"][masked]
      assert 0.75 < np.mean(inputs == special.mask_id) < 0.85  # then 80/10/10 as before, token by token
  assert split_words[True] == 0 and split_words[False] > 100


def test_whole_word_masking_does_not_join_a_word_across_sep():
  """Segment B starting inside a word ("##b") is a word of its own, not the end of A's last word."""
  special = examples.SpecialTokens(cls_id=2, sep_id=3, mask_id=4, pad_id=0, vocab_size=10)
  continues = np.zeros(10, bool)
  continues[[7, 8]] = True  # "##a", "##b"
  chosen = set()
  for seed in range(50):  # [CLS] w ##a [SEP] ##b w [SEP]: words {1, 2}, {4}, {5}; two targets
    example = examples.masked_example([5, 7], [8, 5], False, special, 8, 2, 0.3, np.random.default_rng(seed),
                                      continues)
    chosen.add(tuple(np.flatnonzero(example["labels"] != examples.IGNORE_INDEX)))
  assert chosen == {(1, 2), (4, 5)}


def test_whole_word_masking_needs_wordpiece_pieces(corpus, tokenizer):
  with pytest.raises(UserError, match="data.whole_word_masking needs a WordPiece tokenizer"):
    pipeline.PretrainingData(corpus, tokenizer, data_config(whole_word_masking=True), batch_size=4, seed=0)


def test_dynamic_masking_changes_per_epoch_static_does_not(corpus, tokenizer):
  for masking, same in (("dynamic", False), ("static", True)):
    data = pipeline.PretrainingData(corpus, tokenizer, data_config(masking=masking), batch_size=4, seed=0)
    epoch0, epoch1 = data.document_examples(0, 3), data.document_examples(1, 3)
    identical = epoch0["input_ids"].shape == epoch1["input_ids"].shape and np.array_equal(
        epoch0["input_ids"], epoch1["input_ids"])
    assert identical == same, masking


def test_epochs_wrap_around(tmp_path, tokenizer):
  small = sources.TextFiles([write_corpus(tmp_path, num_docs=3)])
  data = pipeline.PretrainingData(small, tokenizer, data_config(), batch_size=16, seed=0)
  for _ in range(6):
    next(data)
  assert data.state()["epoch"] >= 1


def sentences(text):
  return [text[start:end] for start, end in sources.sentence_spans(text).tolist()]


class _Tokenized(list):
  def all(self):
    return self


class _WholeDocuments(pipeline.PretrainingData):
  """The pipeline as it was until 2026-12-04: every document read is tokenized whole (by transformers)."""

  def __init__(self, source, tokenizer, *args, **kwargs):
    super().__init__(source, tokenizer, *args, **kwargs)
    self.tokenizer = tokenizer

  def _sentences(self, document):
    texts = sentences(self.source[document])
    return _Tokenized(ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"] if ids)


def test_a_random_next_segment_tokenizes_only_the_sentences_it_reads(tmp_path, tokenizer):
  # A random next segment takes a few sentences of another document, which used to be tokenized whole
  # (and kept): a corpus of books yielded about 10 examples a second until every book was cached, in
  # 2 GB for 400 books. The examples are the same as then.
  path = write_corpus(tmp_path, num_docs=6)
  book = "\n".join(f"The d5 w{i % 60} w{(7 * i) % 60}." for i in range(3000))
  with open(path, "a") as f:
    f.write("\n" + book + "\n")
  corpus = sources.TextFiles([path])
  assert len(corpus) == 7
  config = data_config()
  expected = next(_WholeDocuments(corpus, tokenizer, config, batch_size=16, seed=4))
  sentences_tokenized = []

  class CountingEncoder:
    def encode(self, text, **kwargs):
      sentences_tokenized.append(text)
      return encoder.encode(text, **kwargs)
  data = pipeline.PretrainingData(corpus, tokenizer, config, batch_size=16, seed=4)
  encoder, data.encoder = data.encoder, CountingEncoder()
  got = next(data)
  assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
  assert data._order(0)[-1] == 6 and data.state()["position"] < 6  # the book was drawn from, not cut up
  assert sum(got["next_sentence_label"]) >= 4
  assert len(sentences_tokenized) < 200, len(sentences_tokenized)


def test_a_tokenizer_files_truncation_and_padding_do_not_reach_the_examples(corpus, tokenizer):
  # transformers clears them on each of its calls; the pipeline calls the Rust tokenizer itself.
  padded = copy.deepcopy(tokenizer)
  padded.backend_tokenizer.enable_truncation(3)
  padded.backend_tokenizer.enable_padding(length=40)
  for x, y in zip(batches(corpus, tokenizer, 3), batches(corpus, padded, 3)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_pair_truncation_equals_deleting_token_by_token():
  """BERT's rule (trim the longer segment, front or back at random, one token at a time), done in
  O(n) by `_truncate_pair`: the same segments and the same random draws consumed."""
  def token_by_token(a, b, max_num_tokens, rng):
    while len(a) + len(b) > max_num_tokens:
      longer = a if len(a) > len(b) else b
      del longer[0 if rng.random() < 0.5 else -1]

  lengths = np.random.default_rng(0).integers(0, 40, (500, 3))
  for seed, (len_a, len_b, max_num_tokens) in enumerate(lengths):
    expected, got = ([list(range(len_a)), list(range(100, 100 + len_b))] for _ in range(2))
    rng_expected, rng_got = np.random.default_rng(seed), np.random.default_rng(seed)
    token_by_token(*expected, max_num_tokens, rng_expected)
    examples._truncate_pair(*got, max_num_tokens, rng_got)
    assert got == expected and rng_got.random() == rng_expected.random()
