"""Aligning two tokenizations of one text: which augment token an anchor token may read.

An anchor and an augment with different vocabularies read the same *text*. Each token covers a
span of the text's UTF-8 bytes; a token's *end* is the byte offset just after what it covers
(`token_ends`; a byte-fallback piece covers its one byte, BOS/EOS cover nothing). Read in
order, a stream of tokens has read the text up to the end of its last token, so every token
gets a *read key*, an integer that orders what the tokens have read (`read_keys`):

  key = end * KEY_SCALE         for a token that reads past the bytes before it;
  key = previous key + 1        for one that reads no new byte (BOS, EOS, an empty piece):
                                it comes after the token before it and before the next byte.

Keys increase strictly along a stream, so with one shared tokenizer both streams' keys are
identical and "key of the augment token <= key of the anchor token" is exactly "augment index
<= anchor index": today's causal cross mask (`masks.attention_mask` over keys instead of
indices). With two tokenizers, an anchor token attends an augment token only if the augment
token's key is at or below its own: the augment has read no byte the anchor has not.

Decoder inputs are the token stream shifted right behind a 0 (T5X): input position 0 has read
nothing (key 0) and input position t has read through token t - 1 (`decoder_read_keys`).
This module is the only place that knows how text, tokens and keys relate; the models only
see the key arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

# Keys leave room for this many tokens that read nothing new after any one byte offset.
KEY_SCALE = 1 << 10
# The largest text (bytes) whose keys fit int32.
MAX_TEXT_BYTES = (np.iinfo(np.int32).max // KEY_SCALE) - 1


class AlignmentError(ValueError):
  """A tokenizer whose tokens cannot be placed on the text (it does not reproduce it)."""


def _split_shared_spans(begins: Sequence[int], ends: Sequence[int], byte_tokens: Sequence[bool]
                        ) -> np.ndarray:
  """Ends where each run of byte tokens covering one character covers one byte each."""
  ends = np.asarray(ends, np.int64).copy()
  i = 0
  while i < len(ends):
    if not byte_tokens[i]:
      i += 1
      continue
    j = i
    while j + 1 < len(ends) and byte_tokens[j + 1] and begins[j + 1] == begins[i]:
      j += 1
    # Tokens i..j are the bytes of the character(s) at begins[i]..ends[j].
    start = begins[i]
    if ends[j] - start == j - i + 1:
      ends[i:j + 1] = start + np.arange(1, j - i + 2)
    i = j + 1
  return ends


def _sentencepiece_ends(processor: Any, text: str, ids: Sequence[int]) -> np.ndarray:
  proto = processor.encode(text, return_type='proto')
  pieces = list(proto.pieces)
  if [p.id for p in pieces] != list(ids):
    raise AlignmentError('SentencePiece spans do not follow the ids the vocabulary encodes.')
  return _split_shared_spans([p.begin for p in pieces], [p.end for p in pieces],
                             [processor.is_byte(p.id) for p in pieces])


def _gpt2_byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level spelling, inverted: {character: the byte it writes}."""
  spelled = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  decoder = {chr(b): b for b in spelled}
  extra = 0
  for b in range(256):
    if b not in decoder.values():
      decoder[chr(256 + extra)] = b
      extra += 1
  return decoder


def _byte_level_bpe_ends(tokenizer: Any, text: str, ids: Sequence[int]) -> np.ndarray:
  encoding = tokenizer.encode(text, add_special_tokens=False)
  if list(encoding.ids) != list(ids):
    raise AlignmentError('BPE offsets do not follow the ids the vocabulary encodes.')
  # Each byte-level token is its bytes: the ends are their running total when the tokens spell
  # the text exactly (no normaliser, no special token).
  decoder = _gpt2_byte_decoder()
  try:
    spelled = [bytes(decoder[c] for c in token) for token in encoding.tokens]
  except KeyError as e:
    raise AlignmentError(f'a token is not in byte-level spelling: {e}') from None
  if b''.join(spelled) != text.encode('utf-8'):
    raise AlignmentError('the byte-level tokens do not spell the text (a normaliser?).')
  return np.cumsum([len(b) for b in spelled], dtype=np.int64)


def _decoded_prefix_ends(vocabulary: Any, text: str, ids: Sequence[int]) -> np.ndarray:
  """Ends by decoding every prefix (any vocabulary that decodes its own encoding back)."""
  if vocabulary.decode(list(ids)) != text:
    raise AlignmentError(
        f'{type(vocabulary).__name__} does not decode its tokens of {text[:40]!r} back to the '
        'text, so its tokens cannot be placed on it.')
  ends, done = [], 0
  for i in range(len(ids)):
    prefix = vocabulary.decode(list(ids[:i + 1]))
    done = max(done, len(prefix.encode('utf-8')) if text.startswith(prefix) else done)
    ends.append(done)
  return np.asarray(ends, np.int64)


def token_ends(vocabulary: Any, text: str, ids: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """The tokens of `text` in `vocabulary` and the byte offset each ends at.

  Args:
    vocabulary: a seqio vocabulary (SentencePiece, byte-level BPE, or any other whose
      `decode` reproduces the text from its `encode`).
    text: the text.
    ids: its tokens, if already encoded (must be `vocabulary.encode(text)`).

  Returns:
    (ids [N] int32, ends [N] int64): ends are non-decreasing UTF-8 byte offsets into `text`.

  Raises:
    AlignmentError: the tokenizer's spans do not match its ids, or its tokens do not spell the
      text.
  """
  ids = list(vocabulary.encode(text)) if ids is None else [int(i) for i in ids]
  processor = getattr(vocabulary, 'tokenizer', None)
  if processor is not None and hasattr(processor, 'is_byte'):
    ends = _sentencepiece_ends(processor, text, ids)
  elif processor is not None and hasattr(processor, 'encode') and hasattr(processor,
                                                                           'token_to_id'):
    ends = _byte_level_bpe_ends(processor, text, ids)
  else:
    ends = _decoded_prefix_ends(vocabulary, text, ids)
  if len(ends) and (np.any(np.diff(ends) < 0) or ends[0] < 0):
    raise AlignmentError('token spans go backwards in the text.')
  return np.asarray(ids, np.int32), ends


def read_keys(ends: Sequence[int], start: int = 0) -> np.ndarray:
  """Read keys [N] int32 of tokens with byte `ends` (module docstring), in a stream whose
  previous key is `start` (0: nothing read yet).

  Raises:
    AlignmentError: a text too long for int32 keys, or too many tokens that read nothing.
  """
  keys = np.empty(len(ends), np.int64)
  previous = int(start)
  for i, end in enumerate(ends):
    end = int(end)
    if end > MAX_TEXT_BYTES:
      raise AlignmentError(f'texts longer than {MAX_TEXT_BYTES} bytes do not fit int32 keys.')
    if end > previous // KEY_SCALE:
      key = end * KEY_SCALE
    else:
      key = previous + 1
      if key // KEY_SCALE != previous // KEY_SCALE:
        raise AlignmentError(f'more than {KEY_SCALE - 1} tokens read nothing after byte {end}.')
    keys[i] = previous = key
  return keys.astype(np.int32)


def decoder_read_keys(token_keys: np.ndarray) -> np.ndarray:
  """Keys of decoder inputs (the stream shifted right behind a 0): [0, keys[:-1]]."""
  token_keys = np.asarray(token_keys, np.int32)
  return np.concatenate([np.zeros(token_keys.shape[:-1] + (1,), np.int32),
                         token_keys[..., :-1]], axis=-1)


def stream(vocabulary: Any, pieces: Sequence[str | int], *, offset: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and byte ends of a stream made of text pieces and special token ids.

  A `str` piece is tokenized by `vocabulary` (separately from the others, as seqio tokenizes
  each feature); an `int` piece is that token, reading nothing. Byte offsets run over the
  concatenated text, starting at `offset`.

  Returns:
    (ids [N] int32, ends [N] int64).
  """
  ids, ends, position = [], [], int(offset)
  for piece in pieces:
    if isinstance(piece, (int, np.integer)):
      ids.append(int(piece))
      ends.append(position)
      continue
    piece_ids, piece_ends = token_ends(vocabulary, piece)
    ids.extend(piece_ids.tolist())
    ends.extend((piece_ends + position).tolist())
    position += len(piece.encode('utf-8'))
  return np.asarray(ids, np.int32), np.asarray(ends, np.int64)


def text_of(vocabulary: Any, ids: Sequence[int]) -> str:
  """The text `ids` spell in `vocabulary`, without a trailing character whose bytes have not
  all been emitted yet (byte-fallback tokens of one character arrive one at a time)."""
  text = vocabulary.decode([int(i) for i in ids]) if len(ids) else ''
  return text.rstrip('\ufffd')


def _common_prefix(a_ids: Sequence[int], a_ends: Sequence[int], b_ids: Sequence[int],
                   b_ends: Sequence[int]) -> int:
  n = 0
  for a, ae, b, be in zip(a_ids, a_ends, b_ids, b_ends):
    if a != b or ae != be:
      break
    n += 1
  return n


class DecodingRow:
  """One row of decoding with an anchor and an own-tokenizer augment: both tokenizations of a
  prompt and of the text the anchor has generated so far.

  Both streams are decoder inputs: a 0 (read key 0) then every token, so input s + 1 is token
  s. The prompt is tokenized as a piece of its own (as seqio tokenizes 'inputs'), the generated
  text as another; each token the anchor emits extends the text, and the augment re-tokenizes
  the generated text: `push` says which of its inputs changed.

  Args:
    anchor_vocabulary, augment_vocabulary: the two seqio vocabularies.
    prompt: the prompt text.
    anchor_bos, augment_bos: the BOS each model reads first, or None.
  """

  def __init__(self, anchor_vocabulary: Any, augment_vocabulary: Any, prompt: str, *,
               anchor_bos: int | None = None, augment_bos: int | None = None):
    self._anchor_vocabulary = anchor_vocabulary
    self._augment_vocabulary = augment_vocabulary
    head = lambda bos: [] if bos is None else [bos]
    self._prompt_bytes = len(prompt.encode('utf-8'))
    ids, ends = stream(anchor_vocabulary, head(anchor_bos) + [prompt])
    self.anchor_ids, self._anchor_ends = ids.tolist(), ends.tolist()
    ids, ends = stream(augment_vocabulary, head(augment_bos) + [prompt])
    self._augment_prefix = (ids.tolist(), ends.tolist())
    self.augment_ids, self._augment_ends = list(self._augment_prefix[0]), list(
        self._augment_prefix[1])
    self.generated: list[int] = []
    self.rollbacks = 0

  def copy(self) -> 'DecodingRow':
    """An independent copy (a new beam): the same text so far, sharing the vocabularies."""
    other = object.__new__(DecodingRow)
    other.__dict__.update(self.__dict__)
    for name in ('anchor_ids', '_anchor_ends', 'augment_ids', '_augment_ends', 'generated'):
      setattr(other, name, list(getattr(self, name)))
    return other

  def anchor_inputs(self) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, read keys) of the anchor's decoder inputs so far, each [1 + tokens]."""
    keys = read_keys(self._anchor_ends)
    return (np.asarray([0] + self.anchor_ids, np.int32),
            np.concatenate([[0], keys]).astype(np.int32))

  def augment_inputs(self) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, read keys) of the augment's decoder inputs so far, each [1 + tokens]."""
    keys = read_keys(self._augment_ends)
    return (np.asarray([0] + self.augment_ids, np.int32),
            np.concatenate([[0], keys]).astype(np.int32))

  def push(self, token: int) -> Update:
    """Appends the anchor's new `token` and re-tokenizes the generated text for the augment;
    returns what the caches must re-run (`Update`)."""
    old_tokens, old_keys = self.augment_inputs()
    self.generated.append(int(token))
    self.anchor_ids.append(int(token))
    text = text_of(self._anchor_vocabulary, self.generated)
    self._anchor_ends.append(self._prompt_bytes + len(text.encode('utf-8')))
    ids, ends = list(self._augment_prefix[0]), list(self._augment_prefix[1])
    if text:
      new_ids, new_ends = token_ends(self._augment_vocabulary, text)
      ids += new_ids.tolist()
      ends += (new_ends + self._prompt_bytes).tolist()
    keep = _common_prefix(self.augment_ids, self._augment_ends, ids, ends)
    self.rollbacks += keep < len(self.augment_ids)
    self.augment_ids, self._augment_ends = ids, ends
    tokens, keys = self.augment_inputs()
    start = keep + 1  # Decoder inputs 0..keep are unchanged.
    # Anchor inputs whose read set may differ: those whose key reaches the first changed
    # augment input, old or new (keys grow along a stream).
    changed = [k[start] for k in (old_keys, keys) if start < len(k)]
    anchor_keys = self.anchor_inputs()[1]
    last = len(anchor_keys) - 1
    anchor_from = last
    if changed:
      anchor_from = min(last, int(np.searchsorted(anchor_keys, min(changed), side='left')))
    return Update(start, tokens[start:], keys[start:], anchor_from)


class Update(NamedTuple):
  """What `DecodingRow.push` changed.

  Attributes:
    augment_from: the first augment decoder input (cache slot) that changed.
    augment_tokens, augment_keys: the augment's inputs from there on and their read keys.
    anchor_from: the first anchor decoder input to re-run (the new token's, unless an earlier
      one read augment tokens that changed): its bridges' reads differ.
  """

  augment_from: int
  augment_tokens: np.ndarray
  augment_keys: np.ndarray
  anchor_from: int


# The model features of an own-tokenizer augment, beside T5X's decoder-only ones.
STREAM_FEATURES = ('decoder_read_keys', 'augment_input_tokens', 'augment_read_keys',
                   'augment_segment_ids', 'augment_causal_attention')


def prefix_lm_features(anchor_vocabulary: Any, augment_vocabulary: Any, inputs: str,
                       targets: str, *, length: int, augment_length: int | None = None,
                       anchor_bos: int | None = None, augment_bos: int | None = None
                       ) -> dict[str, np.ndarray]:
  """One example as T5X prefix-LM features for the anchor plus the augment's stream.

  Both models read `inputs` then `targets` (each tokenized as a piece of its own, as seqio
  tokenizes features; BOS first where given, EOS after the targets). Anchor features as
  seqio's PrefixLMFeatureConverter writes them (decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights on the targets, decoder_causal_attention on the 0 and the inputs,
  decoder_segment_ids) and STREAM_FEATURES: both streams' read keys and the augment's inputs,
  segments and prompt region. Streams longer than their length lose their end.

  Args:
    anchor_vocabulary, augment_vocabulary: the two seqio vocabularies.
    inputs, targets: the texts.
    length: the anchor's length (inputs + targets tokens).
    augment_length: the augment's (default `length`).
    anchor_bos, augment_bos: the BOS each model reads first, or None.

  Returns:
    {feature: [length] or [augment_length] int32}.
  """
  def one(vocabulary, bos, size, anchor_layout=False):
    head = [] if bos is None else [bos]
    prompt_ids, prompt_ends = stream(vocabulary, head + [inputs])
    ids, ends = stream(vocabulary, [targets, vocabulary.eos_id],
                       offset=len(inputs.encode('utf-8')))
    all_ids = np.concatenate([prompt_ids, ids])[:size]
    keys = read_keys(np.concatenate([prompt_ends, ends]))[:size]
    n = len(all_ids)
    out = {'targets': np.zeros(size, np.int32), 'inputs': np.zeros(size, np.int32),
           'keys': np.zeros(size, np.int32), 'segments': np.zeros(size, np.int32),
           'prompt': np.zeros(size, np.int32), 'weights': np.zeros(size, np.int32)}
    out['targets'][:n] = all_ids
    out['inputs'][1:] = out['targets'][:-1]  # As seqio: a padding input repeats EOS.
    if not anchor_layout:
      out['inputs'][n:] = 0  # The augment's padding is 0 (passed through, padded by seqio).
    out['keys'][:n] = decoder_read_keys(keys)
    out['segments'][:n] = 1
    out['prompt'][:min(n, len(prompt_ids) + 1)] = 1
    out['weights'][len(prompt_ids):n] = 1
    return out
  anchor = one(anchor_vocabulary, anchor_bos, length, anchor_layout=True)
  augment = one(augment_vocabulary, augment_bos, augment_length or length)
  return {'decoder_input_tokens': anchor['inputs'], 'decoder_target_tokens': anchor['targets'],
          'decoder_loss_weights': anchor['weights'],
          'decoder_causal_attention': anchor['prompt'],
          'decoder_segment_ids': anchor['segments'], 'decoder_read_keys': anchor['keys'],
          'augment_input_tokens': augment['inputs'], 'augment_read_keys': augment['keys'],
          'augment_segment_ids': augment['segments'],
          'augment_causal_attention': augment['prompt']}


# ---- The augment's own vocabulary: named in gin, found in the task, carried by the run. ----

VOCABULARY_DIR = 'vocabularies'  # In MODEL_DIR / a composed checkpoint: each augment's own.


def resolve_vocabulary(value: Any) -> Any:
  """A seqio vocabulary from what gin gives: a vocabulary, a SentencePiece `.model` file, a
  `vocab.bpe.json` file, or an LM checkpoint directory that carries its tokenizer.

  Raises:
    FileNotFoundError: a path that does not exist.
    ValueError: a path that is none of these.
  """
  if not isinstance(value, (str, bytes)) and not hasattr(value, 'joinpath'):
    return value  # Already a vocabulary.
  from etils import epath  # pylint: disable=g-import-not-at-top
  from calm_jax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  path = epath.Path(value)
  if not path.exists():
    raise FileNotFoundError(f'augment vocabulary {path} does not exist.')
  if path.is_dir():
    return vocab_lib.load_vocabulary(path)
  if path.name.endswith('.bpe.json'):
    from calm_jax import bpe  # pylint: disable=g-import-not-at-top
    return bpe.ByteLevelBPEVocabulary(path)
  if path.name.endswith('.model'):
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(str(path))
  raise ValueError(f'augment vocabulary {path}: give a SentencePiece .model file, a '
                   'vocab.bpe.json file or an LM checkpoint directory.')


def task_augment_vocabulary(name: str) -> Any:
  """The vocabulary of the augment stream ('augment_input_tokens') of task or mixture `name`,
  or None where it yields none.

  Raises:
    ValueError: tasks of one mixture with different augment vocabularies, or a mixture of
      tasks with and without an augment stream.
  """
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  if not data.is_aligned(data.get_task_or_mixture(name)):
    return None
  found = [t.output_features['augment_input_tokens'].vocabulary for t in data.tasks_of(name)]
  if any(v != found[0] for v in found[1:]):
    raise ValueError(f'the tasks of {name} tokenize the augment stream with different '
                     'vocabularies.')
  return found[0]


def check_task_vocabularies(name: str, augment_vocabularies: Any) -> None:
  """Checks that task `name` yields exactly the streams of `augment_vocabularies` ({augment:
  vocabulary}): one own-tokenizer augment, whose vocabulary is the task's augment stream's.

  Raises:
    ValueError: a task without an augment stream, an aligned task with none given, more than
      one own-tokenizer augment, or a vocabulary other than the task's.
  """
  task_vocabulary = task_augment_vocabulary(name)
  given = dict(augment_vocabularies or {})
  if not given:
    if task_vocabulary is not None:
      raise ValueError(f'{name} yields an augment stream in its own vocabulary: name the '
                       'augment that reads it in '
                       "augment_vocabularies (gin: {'augment': %AUGMENT_VOCABULARY}).")
    return
  if len(given) != 1:
    raise ValueError(f'one augment may read its own tokenization (one stream per task); got '
                     f'{sorted(given)}.')
  if task_vocabulary is None:
    raise ValueError(f'augment {next(iter(given))!r} reads its own tokenization but {name} '
                     'yields no augment stream: register it with '
                     'calm_tasks.memory_tasks.aligned_seq2seq_task.')
  (augment, vocabulary), = given.items()
  if not same_vocabulary(vocabulary, task_vocabulary):
    raise ValueError(f'augment {augment!r}: its vocabulary ({vocabulary}) is not the one {name} '
                     f'tokenizes the augment stream with ({task_vocabulary}).')


def same_vocabulary(a: Any, b: Any) -> bool:
  """Whether `a` and `b` tokenize alike: SentencePiece models by their serialised model (seqio's
  equality also compares the file's path, and a run keeps its own copy), others by `==`."""
  if hasattr(a, 'sp_model') and hasattr(b, 'sp_model'):
    return (a.sp_model == b.sp_model and a.extra_ids == b.extra_ids
            and type(a) is type(b))
  return a == b


def save_vocabulary(vocabulary: Any, directory: Any, name: str) -> str:
  """Writes `vocabulary` (SentencePiece or byte-level BPE) as `directory/VOCABULARY_DIR/<name>.*`
  atomically; returns the path's name relative to `directory`.

  Raises:
    ValueError: a vocabulary of another kind.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  if hasattr(vocabulary, 'sp_model'):
    data, suffix = vocabulary.sp_model, '.model'
  elif hasattr(vocabulary, 'path') and str(vocabulary.path).endswith('.bpe.json'):
    data, suffix = epath.Path(vocabulary.path).read_bytes(), '.bpe.json'
  else:
    raise ValueError(f'cannot save augment vocabulary {vocabulary!r}: SentencePiece and '
                     'byte-level BPE vocabularies only.')
  relative = f'{VOCABULARY_DIR}/{name}{suffix}'
  path = epath.Path(directory) / relative
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(path)
  return relative
