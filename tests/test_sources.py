"""Where pretraining documents come from (bipft_jax/data/sources.py): sentence splitting, WikiText, text
and JSON Lines files (indexed, kept index, .gz and .zst), TFDS; their errors."""
import bz2
import gzip
import json
import mmap
import os
import pickle
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import zstandard

from bipft_jax import config_loading
from bipft_jax.data import pipeline, sources, workers
from bipft_jax.errors import UserError
from test_data import REPO, batches, data_config, gzipped, sentences, tokenizer, write_corpus  # noqa: F401  (a fixture)


def test_sentence_splitting_and_wikitext(tmp_path):
  assert sentences("It rained . Then H. americanus left! \"Why?\" 3 more.\nNext line") == [
      "It rained .", "Then H. americanus left!", "\"Why?\"", "3 more.", "Next line"]
  raw = (" \n = Valkyria = \n \n Intro text @-@ here . Second <unk> sentence . \n = = Part = = \n"
         " More text . \n \n = Homarus = \n Lobster text . \n")
  with gzip.open(tmp_path / "valid.raw.gz", "wt") as f:
    f.write(raw)
  wiki = sources.WikiText(str(tmp_path), "valid")
  assert list(wiki) == ["Intro text-here . Second [UNK] sentence .\nMore text .", "Lobster text ."]
  with pytest.raises(UserError, match="missing"):
    sources.WikiText(str(tmp_path), "train")


def test_sentence_spans_split_as_lines_then_sentence_ends_do():
  # One regular expression over the document (its spans cached, so a random next segment finds a
  # book's sentences without splitting it again) must cut where splitting each line did until 2026-12-04.
  # The rule as first written: whitespace after sentence-ending punctuation, looked behind at (sources
  # matches the punctuation instead, 2.4x faster).
  sentence_end = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")

  def by_lines(text):
    return [s.strip() for line in text.splitlines() for s in sentence_end.split(line) if s.strip()]
  rng = np.random.default_rng(0)
  pieces = np.array(["w", "Two", "3", ".", "!", "?", "\"", "'", "(", ")", "]", " ", "\t", "\n", "\r", "\r\n", "\x0b",
                     "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029", "\xa0", "\u3000", "\ufeff",
                     "H. a"], dtype=object)
  for _ in range(2000):
    text = "".join(rng.choice(pieces, int(rng.integers(0, 40))))
    assert sentences(text) == by_lines(text), repr(text)


def test_text_files_are_indexed_into_the_documents_a_split_of_the_whole_text_gives(tmp_path):
  # Until 2026-12-04 every file was read whole and split at the regular expression below; the index
  # must find the same documents (a run resumed across the change reads the same data).
  rng = np.random.default_rng(0)
  pieces = np.array(["w", "two words", ".", "\n", "\n", "\n", "\r", " ", "\t", "\ufeff", "\u2028", "\x1c", "\xa0",
                     "\u3000", "é", "\x0b"], dtype=object)
  texts = {name: "".join(rng.choice(pieces, 4000)) for name in ("a.txt", "b.txt.gz", "c.txt")}
  texts["empty.txt"] = ""
  for name, text in texts.items():
    with (gzip.open if name.endswith(".gz") else open)(tmp_path / name, "wt", encoding="utf-8") as f:
      f.write(text)
  source = sources.TextFiles([str(tmp_path / "*")])
  expected = [d.strip() for name in sorted(texts) for d in re.split(r"\n\s*\n", texts[name]) if d.strip()]
  assert len(expected) > 300 and list(source) == expected
  assert isinstance(source.contents[0], mmap.mmap) and isinstance(source.contents[1], mmap.mmap)  # a.txt, b.txt.gz
  (tmp_path / "d.txt").write_bytes(b"fine\n\ncaf\xe9\n")
  with pytest.raises(UserError, match=r"d.txt: line 3 is not UTF-8 \(byte 0xe9\)"):
    sources.TextFiles([str(tmp_path / "d.txt")])


_INDEX_WITH_SMALL_FILES_ONLY = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))  # a file system without room
from bipft_jax.data import sources
from bipft_jax.errors import UserError
try:
  sources.TextFiles([sys.argv[1]])
except UserError as e:
  sys.exit(str(e))
"""


def test_a_gz_corpus_is_decompressed_to_disk_not_into_memory(tmp_path, monkeypatch):
  # Until 2026-12-04 a .gz corpus was decompressed into every host's memory; now into an unlinked file
  # of the asset cache, mapped: nothing left on disk after it, an error naming the cache when it is full.
  cache = tmp_path / "cache"
  monkeypatch.setenv("BIPFT_CACHE", str(cache))
  corpus = tmp_path / "corpus.txt.gz"
  with gzip.open(corpus, "wt", encoding="utf-8") as f:
    f.write("".join(f"Document {i} starts. It ends.\n\n" for i in range(10000)))
  source = sources.TextFiles([str(corpus)])
  assert isinstance(source.contents[0], mmap.mmap) and len(source.contents[0]) > 1 << 16
  assert len(source) == 10000 and source[1234] == "Document 1234 starts. It ends."
  assert os.listdir(cache) == []
  full = subprocess.run([sys.executable, "-c", _INDEX_WITH_SMALL_FILES_ONLY, str(corpus)], capture_output=True,
                        text=True, env={**os.environ, "BIPFT_CACHE": str(cache)}, timeout=120)
  assert full.returncode == 1 and full.stderr.strip() == (
      f"cannot decompress text file {corpus} into {cache}: File too large; decompress it yourself (gunzip), "
      "or set BIPFT_CACHE to a folder with room"), full.stderr
  assert os.listdir(cache) == []


def test_a_run_of_lines_longer_than_the_document_limit_is_cut_at_its_line_breaks(tmp_path, monkeypatch):
  # A file without blank lines was one document, read and tokenized whole (294 MB: 14 GB, no batch in
  # 3 minutes); runs of lines beyond MAX_DOCUMENT_BYTES become several documents, cut at line breaks.
  # A longer line is cut at its spaces (whole, a 19 MB line took 323 s to a first batch), or, without
  # any, between UTF-8 characters.
  monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 100)
  long_line = " ".join(f"word{i}." for i in range(60))  # 419 bytes
  lines = [f"Sentence {i} of the dump." for i in range(40)] + [long_line, "é" * 150, "The end."]
  (tmp_path / "dump.txt").write_text("\n".join(lines) + "\n\nA short document.\n")
  documents = list(sources.TextFiles([str(tmp_path / "dump.txt")]))
  assert documents[-1] == "A short document." and all(len(d.encode()) <= 100 for d in documents)
  assert "\n".join(documents[:-1]).split("\n")[:40] == lines[:40]  # the short lines, cut at line breaks only
  words = lambda text: [w for w in text.split() if "é" not in w]
  assert words(" ".join(documents[:-1])) == words("\n".join(lines))  # no word cut in two
  pieces = [d for d in documents if "word" in d]
  assert len(pieces) == 5 and all(p.startswith("word") and p.endswith(".") for p in pieces[1:])
  assert "".join(d for d in documents if "é" in d).replace(" ", "").replace("\n", "") == "é" * 150  # 50 + 50 + 50


def test_json_lines_are_indexed_into_their_records_texts(tmp_path):
  # C4, Dolma and the Pile ship JSON Lines: one object a line, its "text" one document (stripped, as a
  # text file's documents are); blank texts and blank lines are skipped, a UTF-8 BOM is allowed.
  rng = np.random.default_rng(0)
  pieces = np.array(["w", "two words", ".", "\n", "\n\n", " ", "\t", "\u2028", "é", "\"", "\\", "\x00"], dtype=object)
  expected, files = [], {"a.jsonl": [], "b.json.gz": [], "c.jsonl": [], "d.jsonl.zst": []}
  for name, lines in files.items():
    for i in range(60):
      text = "".join(rng.choice(pieces, int(rng.integers(0, 30))))
      lines.append(json.dumps({"id": i, "text": text}, ensure_ascii=bool(i % 2)) if i % 7 else "")
      expected += [text.strip()] if i % 7 and text.strip() else []
    data = ("\ufeff" if name == "a.jsonl" else "") + "\n".join(lines) + "\n"
    if name.endswith(".zst"):  # two frames, as zstd -T writes
      half = len(data) // 2
      (tmp_path / name).write_bytes(b"".join(zstandard.ZstdCompressor().compress(part.encode())
                                             for part in (data[:half], data[half:])))
      continue
    with (gzip.open if name.endswith(".gz") else open)(tmp_path / name, "wt", encoding="utf-8") as f:
      f.write(data)
  source = sources.open_source(ml_collections.ConfigDict({"source": "jsonl", "paths": str(tmp_path / "*"),
                                                          "text_field": "text"}), "train")
  assert isinstance(source, sources.JsonLines) and len(expected) > 100 and list(source) == expected
  assert list(pickle.loads(pickle.dumps(source))) == expected  # as the data workers receive it


def test_a_damaged_or_unreadable_zst_corpus_is_one_line(tmp_path, monkeypatch):
  text = "".join(f"The d{i} w1 w2.\n\n" for i in range(2000)).encode()
  compressed = zstandard.ZstdCompressor().compress(text)
  for name, data, error in [("cut.txt.zst", compressed[:len(compressed) // 2], "it ends inside a zstd frame"),
                            ("cut_at_a_byte.txt.zst", compressed[:-1], "it ends inside a zstd frame"),
                            ("gz.txt.zst", gzip.compress(text), "not zstd data, or damaged")]:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=f"cannot read text file {re.escape(str(tmp_path / name))}: {error}"):
      sources.TextFiles([str(tmp_path / name)])
  (tmp_path / "whole.txt.zst").write_bytes(compressed)
  assert len(sources.TextFiles([str(tmp_path / "whole.txt.zst")])) == 2000
  monkeypatch.setitem(sys.modules, "zstandard", None)  # not installed
  with pytest.raises(UserError, match=r"\.zst files need the zstandard package \(pip install zstandard\)"):
    sources.TextFiles([str(tmp_path / "whole.txt.zst")])


def test_json_lines_give_the_batches_a_text_file_of_the_same_documents_gives(tmp_path, tokenizer):
  text = write_corpus(tmp_path)
  with open(tmp_path / "corpus.jsonl", "w") as f:
    for document in open(text).read().split("\n\n"):
      f.write(json.dumps({"meta": {"n": 1}, "body": document}) + "\n")
  as_text = batches(sources.TextFiles([text]), tokenizer, 6)
  as_json = batches(sources.JsonLines([str(tmp_path / "corpus.jsonl")], text_field="body"), tokenizer, 6)
  for x, y in zip(as_text, as_json):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("line, error", [
    (b'{"text": "a"', "line 2 is not JSON (Expecting ',' delimiter at column 13)"),
    (b'{"text": "caf\xe9"}', "line 2 is not UTF-8 (byte 0xe9); re-encode it as UTF-8"),
    (b'["a", "b"]', "line 2 is a JSON array, not an object with a 'text' field"),
    (b'{"content": "a", "id": 2}', "line 2 has no field 'text' (its fields: 'content', 'id'); set data.text_field"),
    (b'{"text": ["a"]}', "line 2: field 'text' is a JSON array, not a string"),
    (b'{"text": null}', "line 2: field 'text' is a JSON null, not a string"),
])
def test_json_lines_errors_name_the_file_and_line(tmp_path, line, error):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
  with pytest.raises(UserError, match=re.escape(f"cannot read JSON Lines file {path}: {error}") + "$"):
    sources.JsonLines([str(path)])


def test_a_files_index_is_kept_until_the_file_changes(tmp_path, monkeypatch):
  # Indexing reads the whole corpus on every host at every start: a large file's document spans are
  # kept in the asset cache, one entry a file (and JSON Lines field) stamped with its size,
  # modification time and inode.
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "CACHED_INDEX_MIN_BYTES", 1000)
  indexed = []
  for kind in (sources.TextFiles, sources.JsonLines):
    monkeypatch.setattr(kind, "_document_spans", lambda self, contents, path, real=kind._document_spans: (
        indexed.append(os.path.basename(path)) or real(self, contents, path)))
  text = write_corpus(tmp_path)
  records = tmp_path / "corpus.jsonl"
  records.write_text("".join(json.dumps({"text": d, "body": d[::-1]}) + "\n" for d in open(text).read().split("\n\n")))
  documents = list(sources.TextFiles([text]))
  assert list(sources.TextFiles([text])) == documents and indexed == ["corpus.txt"]
  assert list(sources.JsonLines([str(records)])) == documents
  assert list(sources.JsonLines([str(records)], text_field="body")) == [d[::-1] for d in documents]
  assert list(sources.JsonLines([str(records)])) == documents
  assert indexed == ["corpus.txt", "corpus.jsonl", "corpus.jsonl"]  # a field of its own
  with open(text, "a") as f:
    f.write("\nThe d1 w1 added.\n")
  assert list(sources.TextFiles([text])) == documents + ["The d1 w1 added."]
  entries = sorted((tmp_path / "cache" / "corpus_index").iterdir())
  assert len(entries) == 3  # the changed file's entry replaced
  for entry in entries:
    entry.write_bytes(b"PK damaged")
  assert list(sources.TextFiles([text])) == documents + ["The d1 w1 added."]
  assert indexed == ["corpus.txt", "corpus.jsonl", "corpus.jsonl", "corpus.txt", "corpus.txt"]
  (tmp_path / "small.txt").write_text("A small file.\n")
  assert list(sources.TextFiles([str(tmp_path / "small.txt")])) == ["A small file."]
  assert len(list((tmp_path / "cache" / "corpus_index").iterdir())) == 3  # indexed, not kept
  monkeypatch.setenv("BIPFT_CACHE", str(records / "cannot"))  # under a file: no cache, no error
  assert list(sources.TextFiles([text])) == documents + ["The d1 w1 added."]


def test_text_source_errors(tmp_path):
  with pytest.raises(UserError, match=re.escape(f"no file matches '{tmp_path}/*.txt'; set data.paths")):
    sources.TextFiles([str(tmp_path / "*.txt")])
  with pytest.raises(UserError, match="unknown data.source"):
    sources.open_source(ml_collections.ConfigDict({"source": "s3"}), "train")
  two = sources.Concatenated([["a", "b"], ["c"]])
  assert len(two) == 3 and [two[i] for i in range(3)] == ["a", "b", "c"]


def test_every_pattern_must_match_and_each_file_is_read_once(tmp_path):
  """A comma-separated entry that matched nothing (a typo, a space after the comma) was dropped without
  a word; the same file by two names was read twice; `**` matched one folder deep only."""
  corpus = write_corpus(tmp_path)
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("a/one.txt", "a/b/two.txt"):
    shutil.copy(corpus, tmp_path / name)
  os.symlink(corpus, tmp_path / "link.txt")
  with pytest.raises(UserError, match=re.escape(f"no file matches '{tmp_path}/typo.txt' (of ['{corpus}', "
                                                f"'{tmp_path}/typo.txt']); set data.paths and data.eval_paths")):
    sources.TextFiles([corpus, str(tmp_path / "typo.txt")])
  config = data_config(source="text", paths=f"{corpus}, {tmp_path}/a/one.txt", eval_paths="", text_field="text")
  assert sources.open_source(config, "train").paths == [f"{tmp_path}/a/one.txt", corpus]  # the space stripped
  once = sources.TextFiles([corpus, f"{tmp_path}/./corpus.txt", str(tmp_path / "link.txt")])
  assert once.paths == [corpus] and len(once) == len(sources.TextFiles([corpus]))
  assert sources.matching_files([f"{tmp_path}/**/*.txt"]) == [f"{tmp_path}/a/b/two.txt", f"{tmp_path}/a/one.txt",
                                                              corpus]
  assert sources.matching_files([f"{tmp_path}/a/**"]) == [f"{tmp_path}/a/b/two.txt", f"{tmp_path}/a/one.txt"]


def test_a_corpus_cut_short_while_read_is_one_line_not_a_sigbus(tmp_path):
  """A memory-mapped file truncated under a run (a corpus regenerated in place) killed it with SIGBUS, no
  line and no save, at the first read past its new end. Run in a child process: a SIGBUS would kill it."""
  corpus = write_corpus(tmp_path)
  program = (f"import os, sys; from bipft_jax.data import sources; from bipft_jax.errors import UserError\n"
             f"files = sources.TextFiles([{corpus!r}]); os.truncate({corpus!r}, 100)\n"
             f"try:\n  files[len(files) - 1]\nexcept UserError as e:\n  print(e); sys.exit(3)")
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 3, done
  assert done.stdout.startswith(f"{corpus} was cut short while the run read it (100 bytes, "), done.stdout
  assert "put it back and rerun to resume from the newest checkpoint" in done.stdout


def test_files_of_another_format_are_named(tmp_path):
  """A compressed file without its suffix (or of a compression we do not read) was refused as not UTF-8,
  a JSON Lines file under data.source=text trained on its JSON syntax, a pipe read as no text."""
  corpus = write_corpus(tmp_path)
  gz = gzipped(corpus)
  shutil.copy(gz, tmp_path / "corpus.TXT.GZ")
  assert len(sources.TextFiles([str(tmp_path / "corpus.TXT.GZ")])) == len(sources.TextFiles([corpus]))
  shutil.copy(gz, tmp_path / "no_suffix")
  with pytest.raises(UserError, match="no_suffix is gzip-compressed: name it \\*.gz to have it decompressed"):
    sources.TextFiles([str(tmp_path / "no_suffix")])
  with open(corpus, "rb") as f, bz2.open(corpus + ".bz2", "wb") as g:
    g.write(f.read())
  with pytest.raises(UserError, match="corpus.txt.bz2 is bzip2-compressed: decompress it \\(bipft reads .gz and"):
    sources.TextFiles([corpus + ".bz2"])
  for name in ("c4.json", "records.jsonl.gz"):
    shutil.copy(gz if name.endswith(".gz") else corpus, tmp_path / name)
    with pytest.raises(UserError, match=f"data.source=text would read .*{name} as plain text, its JSON syntax too: "
                                        "set --config.data.source=jsonl"):
      sources.TextFiles([str(tmp_path / name)])
  os.mkfifo(tmp_path / "fifo")  # no writer: opening it would wait for one
  with pytest.raises(UserError, match="fifo is not a regular file \\(a pipe\\?\\): write the corpus to a file"):
    sources.TextFiles([str(tmp_path / "fifo")])


def test_a_run_says_what_its_sources_hold():
  assert sources.describe(sources.Concatenated([["a", "b"], ["c"]])) == "3 documents"
  here = os.path.dirname(os.path.abspath(__file__))
  files = sources.TextFiles([os.path.join(here, "test_sources.py"), os.path.join(here, "test_data.py")])
  size = sum(os.path.getsize(p) for p in files.paths)
  assert sources.describe(files) == f"2 files ({size / 1e3:.1f} KB), {len(files):,} documents"
  shards = sources.FileShards("text", files.paths, "text")
  assert sources.describe(shards) == f"2 files ({size / 1e3:.1f} KB)"


def test_held_out_files_that_training_reads_too_are_named(tmp_path):
  corpus, other = write_corpus(tmp_path), str(tmp_path / "other.txt")
  shutil.copy(corpus, other)
  os.symlink(corpus, tmp_path / "link.txt")
  config = data_config(source="text", paths=f"{tmp_path}/*.txt", eval_paths=other)
  assert sources.held_out_in_training(config) == "data.eval_paths names 1 of the training files (other.txt)"
  config = data_config(source="text", paths=corpus, eval_paths=str(tmp_path / "link.txt"))  # the same file
  assert sources.held_out_in_training(config) == "data.eval_paths names 1 of the training files (corpus.txt)"
  config = data_config(source="jsonl", paths=corpus, eval_paths=other)
  assert sources.held_out_in_training(config) == ""
  config = data_config(source="tfds", tfds_split="train", tfds_eval_split="train")
  assert sources.held_out_in_training(config) == "data.tfds_eval_split is the training split, 'train'"


def test_tfds_array_record_source(tmp_path, tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")
  DOCUMENTS = 1006

  class TinyWiki(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"title": tfds.features.Text(), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for d in range(DOCUMENTS):
        yield d, {"title": f"d{d}", "text": "\n".join(f"The d{d} w{i} w{i + 1}." for i in range(8))}

  TinyWiki(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  # The base recipe's splits: Wikipedia has one, so the held-out articles are its last 1,000, kept out
  # of training (until 2026-12-04 the training split was all of it: the "held-out" scores were on
  # training data).
  recipe = config_loading.load_config(os.path.join(REPO, "configs/pretrain.py:base")).data
  config = data_config(source="tfds", tfds_name="tiny_wiki", tfds_data_dir=str(tmp_path),
                       text_field="text", tfds_split=recipe.tfds_split, tfds_eval_split=recipe.tfds_eval_split)
  train, held_out = (sources.open_source(config, split) for split in ("train", "eval"))
  titles = lambda source: {source[i].split()[1] for i in range(len(source))}
  assert len(train) == DOCUMENTS - 1000 and len(held_out) == 1000
  assert not titles(train) & titles(held_out)
  config = data_config(source="tfds", tfds_name="tiny_wiki", tfds_split="train", tfds_data_dir=str(tmp_path),
                       text_field="text")
  source = sources.open_source(config, "train")
  assert len(source) == DOCUMENTS and titles(source) == {f"d{d}" for d in range(DOCUMENTS)}
  batch = next(pipeline.PretrainingData(source, tokenizer, config, batch_size=4, seed=0))
  assert batch["input_ids"].shape == (4, 32)
  pool = workers.ExamplePool(1, [source], tokenizer, config, seed=0)  # the source pickled to a worker
  pooled = next(pipeline.PretrainingData(source, tokenizer, config, batch_size=4, seed=0, pool=pool))
  pool.close()
  for key in batch:
    np.testing.assert_array_equal(pooled[key], batch[key])
  config.text_field = "body"
  with pytest.raises(UserError, match="no feature 'body'"):
    sources.open_source(config, "train")
  config.tfds_name = "no_such_dataset"
  with pytest.raises(UserError, match="cannot open TFDS dataset"):
    sources.open_source(config, "train")
