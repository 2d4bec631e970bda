"""Word-level vocabularies for synthetic tasks: one token per whitespace-separated word.

Ids: 0 PAD, 1 EOS, 2 UNK, then the words in the order given. Each key of the key-value tasks is
one word, hence one token, as in the paper's setting.
"""

from __future__ import annotations

from typing import Sequence

import seqio
import tensorflow as tf

SPECIALS = ('<pad>', '<eos>', '<unk>')


class WordVocabulary(seqio.Vocabulary):
  """Maps whitespace-separated words to ids, in Python and in TensorFlow.

  Args:
    words: the vocabulary's words, without the special tokens; no duplicates or blanks.
  """

  def __init__(self, words: Sequence[str]):
    words = list(words)
    if len(set(words)) != len(words) or any(not w or w.split() != [w] for w in words):
      raise ValueError('WordVocabulary words must be unique, non-empty and without spaces.')
    overlap = set(words) & set(SPECIALS)
    if overlap:
      raise ValueError(f'WordVocabulary words may not include the specials {sorted(overlap)}.')
    super().__init__()
    self._words = list(SPECIALS) + words
    self._ids = {w: i for i, w in enumerate(self._words)}
    # Built eagerly here: a table first built inside one tf.data graph cannot serve another.
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(self._words), tf.constant(list(range(len(self._words))), tf.int64))
    self._table = tf.lookup.StaticHashTable(init, default_value=SPECIALS.index('<unk>'))
    self._words_tf = tf.constant(self._words)

  def reference_kwargs(self) -> dict[str, list[str]]:
    """Constructor arguments that rebuild this vocabulary (used by composed checkpoints)."""
    return {'words': self._words[len(SPECIALS):]}

  def unknown_words(self, text: str) -> list[str]:
    """The words of `text` that are not in the vocabulary, each once, in order (`encode` maps
    them to `<unk>`)."""
    return list(dict.fromkeys(w for w in text.split() if w not in self._ids))

  @property
  def words(self) -> list[str]:
    """All tokens in id order, specials first."""
    return list(self._words)

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def unk_id(self) -> int:
    return 2

  @property
  def _base_vocab_size(self) -> int:
    return len(self._words)

  def _encode(self, s: str) -> list[int]:
    return [self._ids.get(w, self.unk_id) for w in s.split()]

  def _decode(self, ids: Sequence[int]) -> str:
    return ' '.join(self._words[i] for i in ids
                    if i not in (self.pad_id, self.eos_id))

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return tf.cast(self._table.lookup(tf.strings.split(s)), tf.int32)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """Decodes one sequence [T] (pad and EOS dropped)."""
    keep = tf.logical_and(tf.not_equal(ids, self.pad_id), tf.not_equal(ids, self.eos_id))
    return tf.strings.reduce_join(tf.gather(self._words_tf, tf.boolean_mask(ids, keep)),
                                  separator=' ')

  def __eq__(self, other) -> bool:
    return isinstance(other, WordVocabulary) and other.words == self.words

  def __hash__(self) -> int:
    return hash(tuple(self._words))
