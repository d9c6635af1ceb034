"""Tokenizer parity with the pure-Python BERT tokenizer of `transformers`.

In transformers 5 `BertTokenizer` is itself backed by HF `tokenizers` (and ignores a
`vocab_file` argument); the independent pure-Python implementation is
`BertTokenizerLegacy`, which is the reference here.
"""

import numpy as np
import pytest
import transformers

from data_pipelines import tokenizer as tokenizer_lib

_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "红", "色", "连", "衣", "裙", "女", "夏", "季", "新", "款", "空", "的", "买", "一",
    "送", "元", "包", "邮", "，", "。", "！", "？", "、", "：", ",", ".", "!", "-", "(", ")",
    "（", "）", "【", "】", "%",
    "iphone", "pro", "max", "t", "##shirt", "shirt", "nike", "air", "##s", "size", "x",
    "##l", "l", "m", "1", "2", "3", "5", "10", "##0", "cafe", "a", "b", "c",
]

_TEXTS = [
    "红色连衣裙女夏季新款",  # Chinese
    "Nike Air Max size XL",  # ASCII, lower-cased
    "iPhone15 Pro MAX（新款）红色",  # mixed, full-width brackets, unknown word piece
    "买一送一！包邮，10元。【新款】",  # full-width punctuation
    "T-shirt、连衣裙：50%",  # mixed punctuation and word pieces
    "Café  au\tlait\n新款",  # accent stripped, odd whitespace, unknown words
    "红色连衣裙" * 10,  # longer than max_length
    "空",  # the missing-text placeholder
    "",  # empty string
]


@pytest.fixture
def vocab_path(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
  return path


@pytest.mark.parametrize("max_length", [8, 16, 32])
def test_encode_matches_slow_bert_tokenizer(vocab_path, max_length):
  ours = tokenizer_lib.Tokenizer(vocab_path)
  reference = transformers.BertTokenizerLegacy(vocab_file=str(vocab_path))
  ids, mask = ours.encode(_TEXTS, max_length=max_length)
  expected = reference(_TEXTS, padding="max_length", truncation=True,
                       max_length=max_length, return_tensors="np")
  # Guard against a reference that silently ignores the vocabulary (all [UNK]).
  real_tokens = expected["input_ids"][expected["attention_mask"] == 1]
  assert np.mean(real_tokens == _VOCAB.index("[UNK]")) < 0.2
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(_TEXTS), max_length)


def test_special_tokens_and_padding(vocab_path):
  ours = tokenizer_lib.Tokenizer(vocab_path)
  ids, mask = ours.encode(["红色", ""], max_length=6)
  cls, sep, pad = _VOCAB.index("[CLS]"), _VOCAB.index("[SEP]"), _VOCAB.index("[PAD]")
  np.testing.assert_array_equal(
      ids, [[cls, _VOCAB.index("红"), _VOCAB.index("色"), sep, pad, pad],
            [cls, sep, pad, pad, pad, pad]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
  assert ours.vocab_size == len(_VOCAB)


def test_truncation_keeps_sep_last(vocab_path):
  ours = tokenizer_lib.Tokenizer(vocab_path)
  ids, mask = ours.encode(["红色连衣裙" * 10], max_length=5)
  assert mask.sum() == 5
  assert ids[0, 0] == _VOCAB.index("[CLS]") and ids[0, -1] == _VOCAB.index("[SEP]")


def test_missing_vocab_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab"):
    tokenizer_lib.Tokenizer(tmp_path / "nope" / "vocab.txt")


def test_vocab_without_special_tokens_is_rejected(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("[PAD]\n[UNK]\n红\n", encoding="utf-8")
  with pytest.raises((ValueError, TypeError), match="(?i)token"):
    tokenizer_lib.Tokenizer(path)


def test_max_length_too_small(vocab_path):
  with pytest.raises(ValueError, match="max_length"):
    tokenizer_lib.Tokenizer(vocab_path).encode(["红"], max_length=1)
