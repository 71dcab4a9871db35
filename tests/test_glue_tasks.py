"""GLUE readers: every task's TSV layout, TFDS records, CSV/JSONL, batching, and bad inputs."""
import json
import re

import ml_collections
import numpy as np
import pytest

import glue_fixtures
from bipft_jax import pytorch_io
from bipft_jax.errors import UserError
from bipft_jax.glue import tasks


def data_config(**values):
  c = ml_collections.ConfigDict(dict(format="glue", path="", train_file="", dev_file="", test_file="",
                                     text_fields="sentence", label_field="label"))
  c.update(values)
  return c


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return glue_fixtures.write_glue(tmp_path_factory.mktemp("glue_data"), n=8)


EXPECTED_LABELS = {  # label ids of the fixture's 8 rows
    "cola": [0, 1] * 4, "sst2": [0, 1] * 4, "mrpc": [0, 1] * 4, "qqp": [0, 1] * 4, "wnli": [0, 1] * 4,
    "qnli": [1, 0] * 4, "rte": [1, 0] * 4,  # entailment is class 0
    "mnli": [2, 0, 1, 0, 2, 0, 1, 0],      # entailment, neutral, contradiction
}


@pytest.mark.parametrize("name", tasks.GLUE_TASKS)
def test_every_task_reads_its_glue_layout(glue_dir, name):
  task = tasks.get_task(name)
  splits = ("train",) + task.dev_splits + task.test_splits
  read = tasks.read_splits(task, data_config(path=glue_dir), splits)
  assert set(read) == set(splits)
  for split in ("train",) + task.dev_splits:
    assert len(read[split]) == 8
    assert read[split].texts_a[1] == glue_fixtures.sentence(1, 1).strip() or \
        read[split].texts_a[1].strip(' "') == glue_fixtures.sentence(1, 1)
    assert (read[split].texts_b is None) == (name in ("cola", "sst2"))
    if name == "stsb":
      np.testing.assert_allclose(read[split].labels, [(i * 0.7) % 5 for i in range(8)], atol=1e-3)
      assert read[split].labels.dtype == np.float32
    else:
      assert read[split].labels.tolist() == EXPECTED_LABELS[name]
  for split in task.test_splits:
    assert read[split].labels is None
    assert read[split].ids == [str(i) for i in range(8)]


def test_quirks(glue_dir, capsys):
  mrpc = tasks.read_splits(tasks.get_task("mrpc"), data_config(path=f"{glue_dir}/MRPC"), ("train",))["train"]
  # Quoting disabled: the unbalanced quotes stay part of the text and no rows merge.
  assert mrpc.texts_a[0].startswith('" ') and mrpc.texts_b[0].endswith(" '")
  qqp = tasks.read_splits(tasks.get_task("qqp"), data_config(path=glue_dir), ("train",))["train"]
  assert len(qqp) == 8 and "999" not in qqp.ids  # the odd row is skipped, with a note
  assert "skipped 1 malformed rows" in capsys.readouterr().err
  cola = tasks.read_splits(tasks.get_task("cola"), data_config(path=glue_dir), ("train",))["train"]
  assert cola.ids == [str(i) for i in range(8)]  # no index column: row numbers
  ax = tasks.read_splits(tasks.get_task("ax"), data_config(path=glue_dir), ("test",))["test"]
  assert len(ax) == 8 and ax.labels is None


class FakeSource(list):
  """What tfds.data_source returns: a sequence of decoded record dicts (text as bytes)."""


def test_tfds_records_map_to_label_ids():
  records = {
      "train": FakeSource([{"premise": b"a man runs", "hypothesis": b"a man moves", "label": 0, "idx": 0},
                           {"premise": b"a dog sits", "hypothesis": b"a cat runs", "label": 2, "idx": 1}]),
      "validation_matched": FakeSource([{"premise": "p", "hypothesis": "h", "label": 1, "idx": 0}]),
      "test_matched": FakeSource([{"premise": b"p", "hypothesis": b"h", "label": -1, "idx": 7}]),
  }
  asked = []

  def source(name, split):
    asked.append(name)
    return records[split]

  out = tasks.read_tfds(tasks.get_task("mnli"), "", ("train", "dev_matched", "test_matched"), source)
  assert asked == ["glue/mnli"] * 3
  assert out["train"].texts_a == ["a man runs", "a dog sits"] and out["train"].texts_b[1] == "a cat runs"
  assert out["train"].labels.tolist() == [0, 2] and out["dev_matched"].labels.tolist() == [1]
  assert out["test_matched"].labels is None and out["test_matched"].ids == ["7"]
  stsb = tasks.read_tfds(tasks.get_task("stsb"), "", ("train",), lambda n, s: [
      {"sentence1": b"a", "sentence2": b"b", "label": 3.8, "idx": 0}])
  np.testing.assert_allclose(stsb["train"].labels, [3.8])
  with pytest.raises(UserError, match="label id 5 is outside"):
    tasks.read_tfds(tasks.get_task("rte"), "", ("train",), lambda n, s: [
        {"sentence1": b"a", "sentence2": b"b", "label": 5, "idx": 0}])
  with pytest.raises(UserError, match="no field 'sentence2'"):
    tasks.read_tfds(tasks.get_task("rte"), "", ("train",), lambda n, s: [{"sentence1": b"a", "label": 0, "idx": 0}])


def test_tfds_not_prepared_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="TFDS glue/rte split train is not readable"):
    tasks.read_splits(tasks.get_task("rte"), data_config(format="tfds", path=str(tmp_path)), ("train",))


def test_csv_and_jsonl_with_configured_fields(tmp_path):
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"p": f"p{i}", "h": f"h{i}", "gold": g})
                                                  for i, g in enumerate(["entailment", "neutral"])) + "\n")
  (tmp_path / "dev.csv").write_text('p,h,gold\n"a, quoted premise",h,contradiction\n')
  task = tasks.get_task("mnli")
  jsonl = tasks.read_splits(task, data_config(format="jsonl", train_file=str(tmp_path / "train.jsonl"),
                                              text_fields="p,h", label_field="gold"), ("train",))["train"]
  assert jsonl.texts_a == ["p0", "p1"] and jsonl.texts_b == ["h0", "h1"] and jsonl.labels.tolist() == [0, 1]
  dev = tasks.read_records(task, str(tmp_path / "dev.csv"), "csv", ["p", "h"], "gold", True)
  assert dev.texts_a == ["a, quoted premise"] and dev.labels.tolist() == [2]
  with pytest.raises(UserError, match=r"dev.csv has no field 'premise' \(its header: 'p', 'h', 'gold'\); set"):
    tasks.read_records(task, str(tmp_path / "dev.csv"), "csv", ["premise", "h"], "gold", True)


def test_a_field_may_hold_line_breaks_and_unicode_line_separators(tmp_path):
  # A quoted CSV field spanning lines keeps its line break; JSON strings may hold U+2028, U+0085 and a
  # form feed raw (str.splitlines() would cut the record at each).
  texts = ["one\u2028two", "three\x85four\x0cfive", "line\r\nbreak"]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"s": t, "y": "pos"}, ensure_ascii=False) + "\n"
                                            for t in texts), encoding="utf-8")
  (tmp_path / "a.csv").write_bytes('s,y\r\n"line\r\nbreak",neg\r\nplain,pos\r\n'.encode())
  task = tasks.custom_task("neg,pos", 1)
  jsonl = tasks.read_records(task, str(tmp_path / "a.jsonl"), "jsonl", ["s"], "y", True)
  assert jsonl.texts_a == texts and jsonl.labels.tolist() == [1, 1, 1]
  csv_split = tasks.read_records(task, str(tmp_path / "a.csv"), "csv", ["s"], "y", True)
  assert csv_split.texts_a == ["line\r\nbreak", "plain"] and csv_split.labels.tolist() == [0, 1]


def _glue_copy(glue_dir, tmp_path, folder):
  import shutil
  shutil.copytree(f"{glue_dir}/{folder}", tmp_path / folder)
  return tmp_path / folder


def test_bad_glue_files(glue_dir, tmp_path):
  rte = tasks.get_task("rte")
  folder = _glue_copy(glue_dir, tmp_path, "RTE")
  read = lambda: tasks.read_splits(rte, data_config(path=str(tmp_path)), ("train",))
  (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
  with pytest.raises(UserError, match="has no column 'label'"):
    read()
  (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
  with pytest.raises(UserError, match="line 2: unknown label 'maybe' for rte; expected one of entailment"):
    read()
  (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
  with pytest.raises(UserError, match="train.tsv has no examples"):
    read()
  (folder / "train.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n")
  with pytest.raises(UserError, match=r"line 3 is not valid UTF-8 \(byte 0xe9\)"):
    read()
  (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tentailment\n")
  with pytest.raises(UserError, match="line 2 has 3 tab-separated fields, expected at least 4"):
    read()
  (folder / "train.tsv").unlink()
  with pytest.raises(UserError, match="train.tsv is missing"):
    read()
  with pytest.raises(UserError, match="x: label 'high' is not a finite number"):
    tasks.encode_label(tasks.get_task("stsb"), "high", "x")


def test_rt_demo_split_is_fixed_and_disjoint():
  task = tasks.get_task("rt_demo")
  first, again = tasks.read_rt_demo(task), tasks.read_rt_demo(task)
  assert len(first["train"]) + len(first["dev"]) == 12808  # fresh + rotten, plot synopses dropped
  assert len(first["dev"]) == 1281
  assert first["dev"].ids == again["dev"].ids
  assert not set(first["dev"].ids) & set(first["train"].ids)
  assert set(first["train"].labels.tolist()) == {0, 1}


def test_batches_pad_to_buckets_and_cover_every_example(tmp_path):
  tokenizer = pytorch_io.load_tokenizer(glue_fixtures.write_vocab(tmp_path))
  texts = ["the film was good ."] * 5 + ["the film was very very very very good and the plot was bad ."] * 4
  split = tasks.Split(texts, None, np.arange(9, dtype=np.int32) % 2, [str(i) for i in range(9)])
  data = tasks.encode(tokenizer, split, max_length=12)
  assert data.tokens(0).tolist() == tokenizer("the film was good .")["input_ids"]
  assert sorted(set(data.lengths.tolist())) == [7, 12]  # the long ones truncated
  assert data.type_ids.tolist() == [0] * len(data.type_ids)
  buckets = tasks.length_buckets(12, smallest=4)
  assert buckets == (4, 8, 12)
  seen = []
  for batch in tasks.batches(data, 4, buckets, shuffle_seed=1):
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in buckets
    real = batch["positions"] >= 0
    # Shuffled batches group similar lengths: no batch mixes the short and the long examples.
    assert len(set(data.lengths[batch["positions"][real]].tolist())) == 1
    assert batch["weights"].tolist() == real.astype(float).tolist()
    for row in np.flatnonzero(real):
      i = batch["positions"][row]
      k = data.lengths[i]
      assert batch["input_ids"][row, :k].tolist() == data.tokens(i).tolist() and batch["attention_mask"][row].sum() == k
      assert batch["labels"][row] == data.labels[i]
    seen += batch["positions"][real].tolist()
  assert sorted(seen) == list(range(9))
  ordered = list(tasks.batches(data, 4, buckets, sort_by_length=True))
  assert [b["input_ids"].shape[1] for b in ordered] == [8, 12, 12]


def test_custom_task_from_config(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"review": "good film", "stars": "pos"}\n{"review": "bad", "stars": "neg"}\n')
  config = ml_collections.ConfigDict({"task": "custom", "epochs": 3, "data": data_config(
      format="jsonl", train_file=str(tmp_path / "train.jsonl"), text_fields="review", label_field="stars",
      labels="neg,pos")})
  task = tasks.task_from_config(config)
  assert task.labels == ("neg", "pos") and task.metrics == ("accuracy", "f1", "matthews_corr")
  train = tasks.read_splits(task, config.data, ("train",))["train"]
  assert train.texts_a == ["good film", "bad"] and train.texts_b is None and train.labels.tolist() == [1, 0]
  config.data.labels = "neg,neutral,pos"
  assert tasks.task_from_config(config).metrics == ("accuracy",)
  config.data.labels = ""
  with pytest.raises(UserError, match="line 1: label 'pos' is not a finite number"):
    tasks.read_splits(tasks.task_from_config(config), config.data, ("train",))
  config.data.format = "glue"
  with pytest.raises(UserError, match="custom has no glue source"):
    tasks.read_splits(tasks.task_from_config(config), config.data, ("train",))


def test_custom_labels_named_twice_are_refused():
  # `neg,pos,neg` trained a 3-output model whose third class no example could be.
  with pytest.raises(UserError, match="custom task labels 'neg,pos, neg' name 'neg' twice; name each class once"):
    tasks.custom_task("neg,pos, neg", 3)


@pytest.mark.parametrize("name,content,line,shown", [
    ("nan.csv", "s,y\na,1.5\nb,nan\n", 3, "'nan'"),
    ("inf.csv", "s,y\na,-inf\n", 2, "'-inf'"),
    ("empty.csv", "s,y\na,\n", 2, "''"),
    ("nan.jsonl", '{"s": "a", "y": 2}\n\n{"s": "b", "y": NaN}\n', 3, "nan"),
    ("huge.jsonl", '{"s": "a", "y": 1e999}\n', 1, "inf"),
    ("bool.jsonl", '{"s": "a", "y": 0.5}\n{"s": "b", "y": true}\n', 2, "True"),
    ("null.jsonl", '{"s": "a", "y": null}\n', 1, "None"),
])
def test_a_regression_label_must_be_a_finite_number(tmp_path, name, content, line, shown):
  # NaN and Inf scores used to be read, training on until the loss was NaN.
  (tmp_path / name).write_text(content)
  with pytest.raises(UserError, match=rf"{name} line {line}: label {re.escape(shown)} is not a finite number "
                     r"\(custom is a regression task\)"):
    tasks.read_records(tasks.custom_task("", 3), str(tmp_path / name), name.split(".")[1], ["s"], "y", True)


def test_csv_rows_must_match_their_header(tmp_path):
  task, path = tasks.custom_task("neg,pos", 3), tmp_path / "a.csv"
  read = lambda: tasks.read_records(task, str(path), "csv", ["s"], "y", True)
  # Blank lines are skipped; a quoted text spanning lines counts its lines; ids are the rows' order.
  path.write_text('s,y\n\n"one\ntwo",pos\nthree,neg\n')
  split = read()
  assert split.texts_a == ["one\ntwo", "three"] and split.labels.tolist() == [1, 0] and split.ids == ["0", "1"]
  # An unquoted comma in a text used to drop the rest of the text silently.
  path.write_text('s,y\n"one\ntwo",pos\nthree, four,neg\n')
  with pytest.raises(UserError, match=r"a.csv line 4 has 3 fields, the header has 2; quote a text that holds a comma"):
    read()
  path.write_text("s,y\na,pos\nb\n")
  with pytest.raises(UserError, match=r"a.csv line 3 has 1 fields, the header has 2$"):
    read()
  # A repeated column used to give the last one's values.
  path.write_text("s,s,y\na,b,pos\n")
  with pytest.raises(UserError, match=r"a.csv: column 's' appears twice in the header"):
    read()
  path.write_text("")
  with pytest.raises(UserError, match="a.csv has no examples"):
    read()


@pytest.mark.parametrize("separator,name", [("\t", "tab"), (";", "semicolon")])
def test_a_csv_of_another_separator_is_named(tmp_path, separator, name):
  # The header used to be listed with a literal tab in it, and no word on why.
  (tmp_path / "a.csv").write_text(f"s{separator}y\na{separator}pos\n")
  header = re.escape(repr(f"s{separator}y"))  # the tab shown as \t
  with pytest.raises(UserError, match=rf"has no field 's' \(its header: {header}\); the file looks {name}-separated"):
    tasks.read_records(tasks.custom_task("neg,pos", 3), str(tmp_path / "a.csv"), "csv", ["s"], "y", True)


@pytest.mark.parametrize("value,problem", [
    ("12345", "field 's' is a JSON number, not a string"),
    ('["a", "b"]', "field 's' is a JSON array, not a string"),
    ("null", "field 's' is a JSON null, not a string"),
])
def test_a_jsonl_text_must_be_a_string_with_text(tmp_path, value, problem):
  # Numbers and lists used to be str()-ed ("['a', 'b']"), null called a missing field, "" trained on.
  # The line is the file's, blank lines counted.
  (tmp_path / "a.jsonl").write_text('{"s": "a", "t": "b", "y": "pos"}\n\n\n' + f'{{"s": {value}, "t": "b", "y": "neg"}}\n')
  with pytest.raises(UserError, match=rf"a.jsonl line 4: {re.escape(problem)}"):
    tasks.read_records(tasks.custom_task("neg,pos", 3), str(tmp_path / "a.jsonl"), "jsonl", ["s", "t"], "y", True)


def test_an_empty_csv_text_is_refused_and_jsonl_missing_fields_name_the_line(tmp_path):
  task = tasks.custom_task("neg,pos", 3)
  (tmp_path / "a.csv").write_text("s,t,y\na,b,pos\nc,,neg\n , ,neg\n")
  with pytest.raises(UserError, match="a.csv line 4: 's' and 't' are empty; give the example a text or remove it"):
    tasks.read_records(task, str(tmp_path / "a.csv"), "csv", ["s", "t"], "y", True)
  (tmp_path / "a.csv").write_text("s,t,y\na,b,pos\nc,,neg\n")  # one text of a pair may be empty (QQP's are)
  assert tasks.read_records(task, str(tmp_path / "a.csv"), "csv", ["s", "t"], "y", True).texts_b == ["b", ""]
  (tmp_path / "a.csv").write_text("s,y\na,pos\n,neg\n")
  with pytest.raises(UserError, match="a.csv line 3: 's' is empty"):
    tasks.read_records(task, str(tmp_path / "a.csv"), "csv", ["s"], "y", True)
  (tmp_path / "a.jsonl").write_text('\n{"s": "a", "y": "pos"}\n\n{"y": "neg"}\n')
  with pytest.raises(UserError, match=r"a.jsonl line 4 has no field 's' \(fields: y\)"):
    tasks.read_records(task, str(tmp_path / "a.jsonl"), "jsonl", ["s"], "y", True)
