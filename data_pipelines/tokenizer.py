"""BERT WordPiece tokenizer for titles and ASR texts (HF `tokenizers`).

The rbt3/rbt6 Chinese RoBERTa models use BERT's WordPiece scheme: text is cleaned,
lower-cased (accents stripped, as BERT does when lower-casing), every CJK character
becomes its own word, punctuation (ASCII and full-width) is split off, and each word
is cut into WordPiece units of `vocab.txt`. The encoded sequence is
`[CLS] tokens [SEP]`, truncated and padded to a fixed length so that batches have
static shapes under `jit`.

  tokenizer = Tokenizer("vocab.txt")
  ids, mask = tokenizer.encode(["红色连衣裙", "空"], max_length=32)  # int32 [2, 32] each
"""

import os

import numpy as np
import tokenizers

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


class Tokenizer:
  """WordPiece tokenizer with fixed-length output.

  Attributes:
    vocab_path: the `vocab.txt` it was built from (one token per line; line number =
      token id).
    vocab_size: number of tokens in the vocabulary.
    pad_id: id of `[PAD]` (used for padding; mask is 0 there).
  """

  def __init__(self, vocab_path: str | os.PathLike):
    self.vocab_path = os.fspath(vocab_path)
    if not os.path.isfile(self.vocab_path):
      raise FileNotFoundError(
          f"WordPiece vocabulary not found: {self.vocab_path!r} (expected a vocab.txt "
          "with one token per line; set config.data.vocab_path)")
    self._tokenizer = tokenizers.BertWordPieceTokenizer(
        self.vocab_path, clean_text=True, handle_chinese_chars=True,
        strip_accents=None, lowercase=True)
    missing = [t for t in _SPECIAL_TOKENS if self._tokenizer.token_to_id(t) is None]
    if missing:
      raise ValueError(
          f"{self.vocab_path}: vocabulary lacks the special token(s) {missing}")
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.pad_id = self._tokenizer.token_to_id("[PAD]")
    self._num_special = self._tokenizer.num_special_tokens_to_add(is_pair=False)

  def encode(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises `texts` to exactly `max_length` tokens each.

    Args:
      texts: N strings (an empty string gives `[CLS] [SEP]`).
      max_length: output length, `[CLS]` and `[SEP]` included (>= 2).

    Returns:
      (ids, mask): int32 [N, max_length] each; mask is 1 on real tokens, 0 on padding.
    """
    if max_length < self._num_special:
      raise ValueError(f"max_length must be >= {self._num_special}, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      # The truncation and padding below act on this Encoding only, so the shared
      # tokenizer keeps no per-call state (safe across threads and max_lengths).
      encoding = self._tokenizer.encode(text, add_special_tokens=False)
      encoding.truncate(max_length - self._num_special)
      encoding = self._tokenizer.post_process(encoding, add_special_tokens=True)
      ids[row, :len(encoding.ids)] = encoding.ids
      mask[row, :len(encoding.ids)] = 1
    return ids, mask
