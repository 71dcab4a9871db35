"""Small GLUE distribution folders for tests: every task's real column layout and quirks.

Rows are built from a short word list so a tiny WordPiece vocab covers them; in every
classification task the label is readable from the text ("good" = label 1 / entailment, "bad" =
label 0 / the other class), so a tiny model can learn it in a few steps.
"""
import os

WORDS = ("the a film plot is was good bad very and it of to story actor this that here "
         "man woman dog cat runs sits quickly slowly what why how who does , . ? \" '").split()
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(folder) -> str:
  """A WordPiece vocab.txt (what pytorch_io.load_tokenizer reads) for WORDS."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(SPECIAL + tuple(WORDS)) + "\n")
  return str(folder)


def sentence(i: int, label: int) -> str:
  subject = ("the film", "this story", "the actor", "a man", "the dog")[i % 5]
  return f"{subject} was {'very ' * (i % 3)}{'good' if label else 'bad'} ."


def _write(path, lines, bom=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(("\ufeff" if bom else "") + "\n".join(lines) + "\n")


def write_glue(root, n: int = 8) -> str:
  """glue_data/<Folder>/*.tsv for every task, n rows per split; returns the glue_data path."""
  root = str(root)
  labels = [i % 2 for i in range(n)]
  nli = ["entailment" if l else "not_entailment" for l in labels]
  mnli = ["entailment" if l else ("contradiction" if i % 4 == 0 else "neutral") for i, l in enumerate(labels)]
  s = lambda i: sentence(i, labels[i])
  other = lambda i: sentence(i + 1, labels[i])

  # CoLA: train/dev without a header (source, label, original label, sentence); test with one.
  for split in ("train", "dev"):
    _write(f"{root}/CoLA/{split}.tsv", [f"gj04\t{l}\t{'' if l else '*'}\t{s(i)}" for i, l in enumerate(labels)])
  _write(f"{root}/CoLA/test.tsv", ["index\tsentence"] + [f"{i}\t{s(i)}" for i in range(n)])
  for split in ("train", "dev"):
    _write(f"{root}/SST-2/{split}.tsv", ["sentence\tlabel"] + [f"{s(i)} \t{l}" for i, l in enumerate(labels)])
  _write(f"{root}/SST-2/test.tsv", ["index\tsentence"] + [f"{i}\t{s(i)}" for i in range(n)])
  # MRPC: a byte-order mark before "Quality" and unbalanced quotes inside the strings.
  for split in ("train", "dev"):
    _write(f"{root}/MRPC/{split}.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
           + [f"{l}\t{7000 + i}\t{8000 + i}\t\" {s(i)}\t{other(i)} '" for i, l in enumerate(labels)], bom=True)
  _write(f"{root}/MRPC/test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
         + [f"{i}\t{7000 + i}\t{8000 + i}\t{s(i)}\t{other(i)}" for i in range(n)])
  # QQP: one odd row with missing fields in train (skipped, as everyone does).
  for split in ("train", "dev"):
    rows = [f"{100 + i}\t{2 * i}\t{2 * i + 1}\t{s(i)}\t{other(i)}\t{l}" for i, l in enumerate(labels)]
    if split == "train":
      rows.insert(1, "999\t1998\t1999\thow does the dog runs ?")
    _write(f"{root}/QQP/{split}.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + rows)
  _write(f"{root}/QQP/test.tsv", ["id\tquestion1\tquestion2"] + [f"{i}\t{s(i)}\t{other(i)}" for i in range(n)])
  sts_header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
  for split in ("train", "dev"):
    _write(f"{root}/STS-B/{split}.tsv", [sts_header + "\tscore"]
           + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s(i)}\t{other(i)}\t{(i * 0.7) % 5:.3f}"
              for i in range(n)])
  _write(f"{root}/STS-B/test.tsv", [sts_header]
         + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s(i)}\t{other(i)}" for i in range(n)])
  parses = "sentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse"
  mnli_prefix = lambda i: f"{i}\t{31193 + i}\t{31193 + i}n\tgovernment\t( ( a ) )\t( b )\t(ROOT (S a))\t(ROOT (S b))"
  _write(f"{root}/MNLI/train.tsv", [f"index\tpromptID\tpairID\tgenre\t{parses}\tsentence1\tsentence2\tlabel1\tgold_label"]
         + [f"{mnli_prefix(i)}\t{s(i)}\t{other(i)}\t{m}\t{m}" for i, m in enumerate(mnli)])
  for split in ("dev_matched", "dev_mismatched"):
    _write(f"{root}/MNLI/{split}.tsv",
           [f"index\tpromptID\tpairID\tgenre\t{parses}\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5"
            "\tgold_label"] + [f"{mnli_prefix(i)}\t{s(i)}\t{other(i)}" + f"\t{m}" * 6 for i, m in enumerate(mnli)])
  for split in ("test_matched", "test_mismatched"):
    _write(f"{root}/MNLI/{split}.tsv", [f"index\tpromptID\tpairID\tgenre\t{parses}\tsentence1\tsentence2"]
           + [f"{mnli_prefix(i)}\t{s(i)}\t{other(i)}" for i in range(n)])
  for folder, columns, names in (("QNLI", "question\tsentence", nli), ("RTE", "sentence1\tsentence2", nli),
                                 ("WNLI", "sentence1\tsentence2", [str(l) for l in labels])):
    for split in ("train", "dev"):
      _write(f"{root}/{folder}/{split}.tsv", [f"index\t{columns}\tlabel"]
             + [f"{i}\t{s(i)}\t{other(i)}\t{name}" for i, name in enumerate(names)])
    _write(f"{root}/{folder}/test.tsv", [f"index\t{columns}"] + [f"{i}\t{s(i)}\t{other(i)}" for i in range(n)])
  _write(f"{root}/diagnostic/diagnostic.tsv", ["index\tsentence1\tsentence2"]
         + [f"{i}\t{s(i)}\t{other(i)}" for i in range(n)])
  return root
