"""Tokenizers of imported models as SeqIO vocabularies.

An LM checkpoint may carry its tokenizer beside `config.json`: `vocab.model` (a SentencePiece
model) or `vocab.bpe.json` (a byte-level BPE tokenizer); `calm-convert --gguf_file=...` writes
the one the GGUF's tokenizer is. `load_vocabulary(checkpoint)` returns it as a SeqIO vocabulary,
which tasks, `calm-infer`, `calm-generate` and `calm-export` use.

A GGUF SentencePiece tokenizer (`tokenizer.ggml.model = 'llama'`, as Llama 2 and Gemma ship)
becomes a BPE SentencePiece model with the file's pieces in id order, their scores and types
(NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE share GGUF's numbering), byte fallback
when the file has byte pieces, and an identity normaliser that escapes spaces as U+2581 and adds
a dummy prefix only if the file says so (`tokenizer.ggml.add_space_prefix`). llama.cpp writes
Gemma's pieces of two or more spaces with real spaces; they are spelled with U+2581 again, as
SentencePiece matches them after escaping.

A GPT-2-style byte-level BPE tokenizer (`tokenizer.ggml.model = 'gpt2'`, as Qwen and Llama 3
ship) has no SentencePiece form: it is saved as `vocab.bpe.json` and loads as a
`calm_jax.bpe.ByteLevelBPEVocabulary` (see there).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from etils import epath

from calm_jax.checkpoints import CheckpointError

VOCAB_FILE = 'vocab.model'
BPE_FILE = 'vocab.bpe.json'
_SPACE = '\u2581'


def _sp_pb2():
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  return sentencepiece_model_pb2


def sentencepiece_model_from_gguf(f: Any) -> Any:
  """The SentencePiece `ModelProto` of the tokenizer inside GGUF file `f` (a `GGUFFile`).

  Raises:
    CheckpointError: the file holds no tokenizer, or an incomplete one.
    UnsupportedModelError: a tokenizer model other than SentencePiece ('llama').
  """
  from calm_jax.convert.hf_config import UnsupportedModelError  # pylint: disable=g-import-not-at-top
  kind = f.get('tokenizer.ggml.model')
  tokens = f.get('tokenizer.ggml.tokens')
  if kind is None or tokens is None:
    raise CheckpointError(f'{f.path} holds no tokenizer (no tokenizer.ggml.model / '
                          'tokenizer.ggml.tokens); pass --skip_tokenizer to convert the weights '
                          'alone.')
  if kind != 'llama':
    raise UnsupportedModelError(
        f'{f.path} has a {kind!r} tokenizer, not a SentencePiece one (\'llama\').')
  scores = f.get('tokenizer.ggml.scores')
  types = f.get('tokenizer.ggml.token_type')
  if scores is None or types is None or not len(scores) == len(types) == len(tokens):
    raise CheckpointError(f'{f.path} has an incomplete tokenizer: {len(tokens)} tokens but '
                          f'{None if scores is None else len(scores)} scores and '
                          f'{None if types is None else len(types)} types.')
  pb2 = _sp_pb2()
  model = pb2.ModelProto()
  trainer = model.trainer_spec
  trainer.model_type = pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = any(int(t) == pb2.ModelProto.SentencePiece.BYTE for t in types)
  # SentencePiece finds its special tokens by piece (`bos_piece`), not by id: both are set.
  special = {}
  for field, key in (('unk', 'unknown_token_id'), ('bos', 'bos_token_id'),
                     ('eos', 'eos_token_id'), ('pad', 'padding_token_id')):
    value = f.get(f'tokenizer.ggml.{key}')
    if value is not None and not 0 <= int(value) < len(tokens):
      raise CheckpointError(f'{f.path}: tokenizer.ggml.{key} = {value} is not a token id.')
    special[field] = -1 if value is None else int(value)
    setattr(trainer, f'{field}_id', special[field])
    if value is not None:
      setattr(trainer, f'{field}_piece', tokens[int(value)])
  normalizer = model.normalizer_spec
  normalizer.name = 'identity'
  normalizer.add_dummy_prefix = bool(f.get('tokenizer.ggml.add_space_prefix', True))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  seen = set()
  for i, (token, score, kind_id) in enumerate(zip(tokens, scores, types)):
    if token and not token.strip(' '):
      token = _SPACE * len(token)
    if token in seen:
      raise CheckpointError(f'{f.path}: tokenizer piece {token!r} (id {i}) occurs twice.')
    seen.add(token)
    piece = model.pieces.add()
    # The unknown token is SentencePiece's UNKNOWN piece (llama.cpp may type it CONTROL).
    if i == special['unk']:
      kind_id = pb2.ModelProto.SentencePiece.UNKNOWN
    piece.piece, piece.score, piece.type = token, float(score), int(kind_id)
  return model


class GGUFTokenizer(NamedTuple):
  """A GGUF file's tokenizer, ready to be saved beside the LM checkpoint.

  Attributes:
    file: VOCAB_FILE (SentencePiece) or BPE_FILE (byte-level BPE).
    data: the file's bytes.
    size: the number of tokens.
  """

  file: str
  data: bytes
  size: int


def tokenizer_from_gguf(f: Any) -> GGUFTokenizer:
  """The tokenizer inside GGUF file `f` (a `GGUFFile`): SentencePiece ('llama') or byte-level
  BPE ('gpt2').

  Raises:
    CheckpointError: the file holds no tokenizer, or an incomplete one.
    UnsupportedModelError: another tokenizer model.
  """
  from calm_jax.convert.hf_config import UnsupportedModelError  # pylint: disable=g-import-not-at-top
  kind = f.get('tokenizer.ggml.model')
  if kind == 'gpt2' and f.get('tokenizer.ggml.tokens') is not None:
    import json  # pylint: disable=g-import-not-at-top
    from calm_jax import bpe  # pylint: disable=g-import-not-at-top
    document = bpe.document_from_gguf(f, error=CheckpointError)
    return GGUFTokenizer(BPE_FILE, json.dumps(document, ensure_ascii=False).encode('utf-8'),
                         document['vocab_size'])
  if kind not in (None, 'llama'):
    raise UnsupportedModelError(
        f'{f.path} has a {kind!r} tokenizer; SentencePiece (\'llama\') and byte-level BPE '
        '(\'gpt2\') tokenizers convert to a vocabulary; pass --skip_tokenizer to convert the '
        'weights alone.')
  model = sentencepiece_model_from_gguf(f)
  return GGUFTokenizer(VOCAB_FILE, model.SerializeToString(), len(model.pieces))


def save_vocabulary(directory: str | epath.Path, tokenizer: GGUFTokenizer) -> epath.Path:
  """Writes `tokenizer` into LM checkpoint `directory`, atomically; returns its path."""
  path = epath.Path(directory) / tokenizer.file
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(tokenizer.data)
  tmp.replace(path)
  return path


def defined_bos_id(vocabulary: Any) -> int | None:
  """The seqio vocabulary's BOS id, or None where it defines none."""
  try:
    bos = vocabulary.bos_id
  except NotImplementedError:  # seqio's default for vocabularies without one.
    return None
  return bos if bos is not None and bos >= 0 else None


def model_bos_id(vocabulary: Any) -> int | None:
  """The BOS id that a model of this vocabulary reads first, or None: the vocabulary's BOS
  where it defines one, unless it says that its models read none (a byte-level BPE's
  `add_bos`, false for Qwen). Gemma and Llama read BOS; T5X-style vocabularies define none."""
  bos = defined_bos_id(vocabulary)
  return bos if bos is not None and getattr(vocabulary, 'add_bos', True) else None


def has_vocabulary(checkpoint: str | epath.Path) -> bool:
  """Whether the LM checkpoint directory carries a tokenizer (VOCAB_FILE or BPE_FILE)."""
  return any((epath.Path(checkpoint) / name).exists() for name in (VOCAB_FILE, BPE_FILE))


def load_vocabulary(checkpoint: str | epath.Path) -> Any:
  """The SeqIO vocabulary saved in LM checkpoint `checkpoint`: a
  `seqio.SentencePieceVocabulary` (VOCAB_FILE) or a `bpe.ByteLevelBPEVocabulary` (BPE_FILE).

  Raises:
    CheckpointError: the checkpoint carries neither.
  """
  directory = epath.Path(checkpoint)
  if (directory / BPE_FILE).exists():
    from calm_jax import bpe  # pylint: disable=g-import-not-at-top
    return bpe.ByteLevelBPEVocabulary(directory / BPE_FILE)
  import seqio  # pylint: disable=g-import-not-at-top
  path = directory / VOCAB_FILE
  if not path.exists():
    raise CheckpointError(f'{checkpoint} carries no tokenizer ({VOCAB_FILE} or {BPE_FILE}); '
                          'give a task vocabulary instead.')
  return seqio.SentencePieceVocabulary(str(path))
