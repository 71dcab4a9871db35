"""BERT pretraining examples from tokenized documents: NSP segment pairs and 80/10/10 masking.

Follows Google BERT's `create_pretraining_data.py`: segments fill a target length (shorter with
probability `short_seq_prob`), segment B is the true continuation or, half the time, a random span
of another document (label 1, as in Hugging Face's `next_sentence_label`), unused segments go back
to the document, and pairs are truncated from a random end. Then `mask_prob` of the tokens
(at most `max_predictions`, at least 1, never [CLS]/[SEP]) become prediction targets:
80% [MASK], 10% a random token, 10% unchanged; with whole-word masking (BERT's
`do_whole_word_mask`) a word's WordPiece pieces are chosen together, each then masked as above.
"""
import dataclasses
from typing import Callable, Optional

import numpy as np

from bipft_jax.errors import UserError

IGNORE_INDEX = -100  # label of positions without an MLM target (losses.cross_entropy skips them)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  cls_id: int
  sep_id: int
  mask_id: int
  pad_id: int
  vocab_size: int

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
    return cls(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
               tokenizer.pad_token_id, len(tokenizer))


def word_continuations(tokenizer) -> np.ndarray:
  """By token id, whether the token continues a word (a WordPiece "##" piece): whole-word masking's
  grouping."""
  model = tokenizer.backend_tokenizer.model
  prefix = getattr(model, "continuing_subword_prefix", None)
  continues = np.zeros(len(tokenizer), bool)
  if prefix:
    for token, index in tokenizer.get_vocab().items():
      continues[index] = token.startswith(prefix) and len(token) > len(prefix)
  if not continues.any():
    raise UserError(f"data.whole_word_masking needs a WordPiece tokenizer, whose pieces inside a word start with "
                    f"'##'; this one ({type(model).__name__}) has none: set data.whole_word_masking=False")
  return continues


def segment_pairs(document: list, random_document: Callable[[], list], max_num_tokens: int,
                  short_seq_prob: float, rng: np.random.Generator) -> list:
  """[(tokens_a, tokens_b, is_random_next)] from one document (a list of tokenized sentences).

  `random_document()` returns another tokenized document for random-next segments.
  """
  target_length = max_num_tokens
  if rng.random() < short_seq_prob:
    target_length = int(rng.integers(2, max_num_tokens + 1))
  pairs, chunk, chunk_length, i = [], [], 0, 0
  while i < len(document):
    chunk.append(document[i])
    chunk_length += len(document[i])
    if i == len(document) - 1 or chunk_length >= target_length:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      tokens_a = [t for segment in chunk[:a_end] for t in segment]
      is_random_next = len(chunk) == 1 or rng.random() < 0.5
      if is_random_next:
        other = random_document()
        tokens_b = []
        # By index, not other[start:]: slicing copies the rest of the document for every pair (quadratic
        # in the sentences of a long document).
        for j in range(int(rng.integers(0, len(other))) if other else 0, len(other)):
          tokens_b.extend(other[j])
          if len(tokens_b) >= target_length - len(tokens_a):
            break
        i -= len(chunk) - a_end  # the unused segments start the next pair
      else:
        tokens_b = [t for segment in chunk[a_end:] for t in segment]
      _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
      if tokens_a and tokens_b:
        pairs.append((tokens_a, tokens_b, is_random_next))
      chunk, chunk_length = [], 0
    i += 1
  return pairs


def _truncate_pair(tokens_a: list, tokens_b: list, max_num_tokens: int, rng: np.random.Generator) -> None:
  """Trims the longer segment, from the front or the back at random, one token at a time until the
  pair fits (BERT's rule), in O(n): the same random draws and result as deleting token by token."""
  excess = len(tokens_a) + len(tokens_b) - max_num_tokens
  if excess <= 0:
    return
  # Which segment each deletion hits: the longer one until they are level, then b, a, b, a, ...
  level = min(abs(len(tokens_a) - len(tokens_b)), excess)
  from_a = np.concatenate([np.full(level, len(tokens_a) > len(tokens_b)), np.arange(excess - level) % 2 == 1])
  from_front = rng.random(excess) < 0.5
  for tokens, hits in ((tokens_a, from_a), (tokens_b, ~from_a)):
    front, back = int(np.sum(hits & from_front)), int(np.sum(hits & ~from_front))
    del tokens[len(tokens) - back:]
    del tokens[:front]


def masked_example(tokens_a: list, tokens_b: list, is_random_next: bool, special: SpecialTokens,
                   max_seq_length: int, max_predictions: int, mask_prob: float,
                   rng: np.random.Generator, word_continuations: Optional[np.ndarray] = None) -> dict:
  """One padded example: input_ids, token_type_ids, attention_mask, labels (L each),
  mlm_positions and mlm_labels (max_predictions each; padding has label -100), next_sentence_label.

  With `word_continuations` (`word_continuations(tokenizer)`), whole words are the targets."""
  tokens = [special.cls_id] + tokens_a + [special.sep_id] + tokens_b + [special.sep_id]
  types = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
  if len(tokens) > max_seq_length:
    raise ValueError(f"pair of {len(tokens)} tokens exceeds max_seq_length {max_seq_length}")
  candidates = np.array([i for i, t in enumerate(tokens) if t not in (special.cls_id, special.sep_id)])
  num_to_predict = min(max_predictions, max(1, int(round(len(tokens) * mask_prob))))
  if word_continuations is None:
    positions = np.sort(rng.permutation(candidates)[:num_to_predict])
  else:
    positions = _whole_word_positions(tokens, candidates, word_continuations, num_to_predict, rng)
  input_ids = np.full(max_seq_length, special.pad_id, np.int32)
  input_ids[:len(tokens)] = tokens
  labels = np.full(max_seq_length, IGNORE_INDEX, np.int32)
  labels[positions] = input_ids[positions]
  choice = rng.random(len(positions))
  random_tokens = rng.integers(0, special.vocab_size, len(positions))
  input_ids[positions] = np.where(choice < 0.8, special.mask_id,
                                  np.where(choice < 0.9, input_ids[positions], random_tokens))
  example = {
      "input_ids": input_ids,
      "token_type_ids": np.pad(np.array(types, np.int32), (0, max_seq_length - len(types))),
      "attention_mask": (np.arange(max_seq_length) < len(tokens)).astype(np.int32),
      "labels": labels,
      "mlm_positions": np.zeros(max_predictions, np.int32),
      "mlm_labels": np.full(max_predictions, IGNORE_INDEX, np.int32),
      "next_sentence_label": np.int32(is_random_next),
  }
  example["mlm_positions"][:len(positions)] = positions
  example["mlm_labels"][:len(positions)] = labels[positions]
  return example


def _whole_word_positions(tokens: list, candidates: np.ndarray, word_continuations: np.ndarray,
                          num_to_predict: int, rng: np.random.Generator) -> np.ndarray:
  """Whole words in a random order, each taken if it still fits in `num_to_predict` (BERT's rule: a
  word that would overshoot is skipped for a shorter one). A "##" piece joins the word of the
  token before it only if that token is a candidate: BERT's code would join a segment B that starts
  inside a word to the end of segment A, across [SEP]."""
  starts = np.ones(len(candidates), bool)
  starts[1:] = ~(word_continuations[np.asarray(tokens)[candidates[1:]]] & (np.diff(candidates) == 1))
  words = np.split(candidates, np.flatnonzero(starts)[1:])
  chosen, count = [], 0
  for w in rng.permutation(len(words)):
    if count + len(words[w]) <= num_to_predict:
      chosen.append(words[w])
      count += len(words[w])
      if count == num_to_predict:
        break
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, int)
