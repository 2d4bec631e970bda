"""Byte-level BPE tokenizers (GPT-2 style: Qwen, Llama 3) as a SeqIO vocabulary.

A GGUF file whose tokenizer is `tokenizer.ggml.model = 'gpt2'` stores its tokens in GPT-2's
byte-to-unicode spelling, its merges ("a b", highest priority first), the token types (CONTROL
tokens such as `<|endoftext|>`, USER_DEFINED ones such as `<think>`) and, as
`tokenizer.ggml.pre`, the name of the regular expression that splits text before BPE. There is
no SentencePiece form of such a tokenizer: `document_from_gguf` rebuilds it as a Hugging Face
`tokenizers` pipeline (split by that expression, byte-level spelling, BPE, byte-level decoding),
and `ByteLevelBPEVocabulary` serves it to SeqIO. Both live in one file, `vocab.bpe.json` beside
the LM checkpoint: the `tokenizers` JSON under "tokenizer" and the special ids the GGUF gives.

T5X pipelines read id 0 as padding (seqio's feature converters give it no loss weight). In a
byte-level vocabulary id 0 is a real token ('!' for Qwen and Llama 3), which therefore gets no
loss weight when such a vocabulary is trained on; decoding and generation keep it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from etils import epath
import numpy as np
import seqio
import tensorflow as tf
import tokenizers

FORMAT = 'calm_jax.byte_level_bpe.v1'

# The split expressions of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, as the
# models publish them (GPT-2's, Llama 3's: numbers in runs of up to three digits, Qwen 2's: one
# digit at a time).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPLITS = {'gpt2': _GPT2, 'llama-bpe': _LLAMA3, 'llama3': _LLAMA3, 'llama-v3': _LLAMA3,
          'smaug-bpe': _LLAMA3, 'qwen2': _QWEN2, 'deepseek-r1-qwen': _QWEN2}
# Llama 3's tokenizer takes a whole split that is itself a token before applying merges (as
# tiktoken and llama.cpp do); the others apply merges only.
_WHOLE_WORDS_FIRST = frozenset({'llama-bpe', 'llama3', 'llama-v3', 'smaug-bpe'})
_CONTROL, _USER_DEFINED = 3, 4


def _byte_alphabet() -> set[str]:
  """The 256 characters GPT-2's byte-level spelling writes bytes with."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  return {chr(b) for b in printable} | {chr(256 + n) for n in range(256 - len(printable))}


def document_from_gguf(f: Any, error: type[Exception] = ValueError) -> dict[str, Any]:
  """The `vocab.bpe.json` document of the byte-level BPE tokenizer in GGUF file `f`.

  Args:
    f: a `calm_jax.convert.gguf_file.GGUFFile` with `tokenizer.ggml.model = 'gpt2'`.
    error: the exception raised for a missing or inconsistent part.

  Raises:
    error: no merges, an unknown pre-tokenizer, special ids out of range, a repeated token.
  """
  tokens = list(f.get('tokenizer.ggml.tokens'))
  merges = f.get('tokenizer.ggml.merges')
  types = f.get('tokenizer.ggml.token_type')
  pre = f.get('tokenizer.ggml.pre') or 'gpt2'
  if not merges:
    raise error(f'{f.path}: the byte-level BPE tokenizer lists no merges '
                '(tokenizer.ggml.merges).')
  if pre not in SPLITS:
    raise error(f'{f.path}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); known: '
                f'{", ".join(sorted(SPLITS))}.')
  if types is not None and len(types) != len(tokens):
    raise error(f'{f.path}: {len(tokens)} tokens but {len(types)} token types.')
  vocab = {}
  for i, token in enumerate(tokens):
    if token in vocab:
      raise error(f'{f.path}: tokenizer token {token!r} (id {i}) occurs twice.')
    vocab[token] = i
  special = {}
  for name, key in (('bos_id', 'bos_token_id'), ('eos_id', 'eos_token_id'),
                    ('unk_id', 'unknown_token_id'), ('pad_id', 'padding_token_id')):
    value = f.get(f'tokenizer.ggml.{key}')
    if value is not None and not 0 <= int(value) < len(tokens):
      raise error(f'{f.path}: tokenizer.ggml.{key} = {value} is not a token id.')
    special[name] = None if value is None else int(value)
  if special['eos_id'] is None:
    raise error(f'{f.path}: the tokenizer names no EOS token (tokenizer.ggml.eos_token_id).')
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(' ')
    if not sep or not left or not right:
      raise error(f'{f.path}: malformed merge {merge!r} (expected "left right").')
    pairs.append((left, right))

  model = tokenizers.models.BPE(vocab=vocab, merges=pairs,
                                ignore_merges=pre in _WHOLE_WORDS_FIRST)
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(SPLITS[pre]), behavior='isolated'),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  # Control and user-defined tokens are matched whole in the text (as llama.cpp does); a
  # control token spelled outside the byte alphabet is a label no text can produce.
  alphabet = _byte_alphabet()
  added = []
  for token, kind in zip(tokens, types if types is not None else ()):
    if int(kind) == _CONTROL and set(token) <= alphabet:
      added.append(tokenizers.AddedToken(token, special=True, normalized=False))
    elif int(kind) == _USER_DEFINED:
      added.append(tokenizers.AddedToken(token, special=False, normalized=False))
  if added:
    tokenizer.add_tokens(added)
  return {'format': FORMAT, 'pre_tokenizer': pre, 'vocab_size': len(tokens), **special,
          'add_bos': bool(f.get('tokenizer.ggml.add_bos_token', False)),
          'tokenizer': json.loads(tokenizer.to_str())}


class ByteLevelBPEVocabulary(seqio.Vocabulary):
  """A byte-level BPE tokenizer (a `document_from_gguf` document in a file) as a SeqIO
  vocabulary.

  `decode` drops control tokens (BOS, EOS, padding), as SentencePiece does; `encode` adds none.
  Without a padding id in the file, the EOS id pads (seqio's `decode_tf` fills after EOS with
  `pad_id`, which must decode to nothing).

  Args:
    path: the `vocab.bpe.json` file.
    extra_ids: seqio's extra ids above the file's tokens.
  """

  def __init__(self, path: str | epath.Path, extra_ids: int = 0):
    super().__init__(extra_ids=extra_ids)
    self.path = epath.Path(path)
    document = json.loads(self.path.read_text())
    if document.get('format') != FORMAT:
      raise ValueError(f'{path} is not a {FORMAT} file (format {document.get("format")!r}).')
    self._document = document
    self._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(document['tokenizer']))

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer`."""
    return self._tokenizer

  @property
  def bos_id(self) -> int | None:
    return self._document['bos_id']

  @property
  def eos_id(self) -> int | None:
    return self._document['eos_id']

  @property
  def unk_id(self) -> int | None:
    return self._document['unk_id']

  @property
  def pad_id(self) -> int:
    pad = self._document['pad_id']
    return self.eos_id if pad is None else pad

  @property
  def add_bos(self) -> bool:
    """Whether the model was trained with BOS first (`tokenizer.ggml.add_bos_token`)."""
    return self._document['add_bos']

  @property
  def _base_vocab_size(self) -> int:
    return self._document['vocab_size']

  def _encode(self, s: str) -> Sequence[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    ids = tf.numpy_function(
        lambda text: np.asarray(self._encode(np.asarray(text).item().decode('utf-8')),
                                np.int32), [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode(array):
      rows = array.reshape(-1, array.shape[-1])
      texts = [self._decode(row).encode('utf-8') for row in rows]
      return np.asarray(texts, dtype=object).reshape(array.shape[:-1])
    out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other: Any) -> bool:
    return (isinstance(other, ByteLevelBPEVocabulary) and self.extra_ids == other.extra_ids
            and self._document == other._document)

  def __hash__(self) -> int:
    return hash((self._document['vocab_size'], self.eos_id, self.extra_ids))
