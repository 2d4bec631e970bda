"""The key-value arithmetic data and SeqIO tasks, the word vocabulary, greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from calm_jax import decoding
from calm_jax.configs import TransformerConfig
from calm_jax.transformer import Transformer
from calm_tasks import kv_arithmetic, kv_data
from calm_tasks.vocabularies import WordVocabulary

SPEC = kv_data.KVSpec()


def test_split_is_disjoint_sized_and_covers_every_value():
  held_in, held_out = kv_data.split_keys(SPEC)
  assert not set(held_in) & set(held_out)
  assert len(held_in) + len(held_out) == SPEC.num_keys
  assert len(held_in) == round(SPEC.held_in_fraction * SPEC.num_keys)
  repo = kv_data.key_values(SPEC)
  assert {repo[k] for k in held_in} == set(range(SPEC.min_value, SPEC.max_value + 1))


@pytest.mark.parametrize('keys', ['held_in', 'held_out'])
def test_kv_arithmetic_uses_only_its_key_set(keys):
  allowed = set(kv_data.keys_of(SPEC, keys))
  repo = kv_data.key_values(SPEC)
  for inputs, targets in kv_data.kv_arithmetic(SPEC, 300, seed=3, keys=keys):
    words = inputs.split()
    operands = words[0:-1:2]
    assert set(operands) <= allowed
    ops = words[1:-1:2]
    assert kv_data.format_number(kv_data.evaluate([repo[k] for k in operands], ops)) == targets


def test_substitution_and_numeric_targets():
  repo = kv_data.key_values(SPEC)
  for inputs, targets in kv_data.kv_substitution(SPEC, 100, seed=1):
    assert inputs.endswith(' ->'), inputs
    expected = ' '.join(str(repo[w]) if w in repo else w for w in inputs.split()[:-1])
    assert targets == expected
  for inputs, targets in kv_data.numeric_arithmetic(SPEC, 100, seed=1):
    assert int(targets.replace(' ', '')) == eval(inputs[:-1])  # pylint: disable=eval-used


def test_evaluation_expressions_never_occur_in_the_composition_set():
  train = {i for i, _ in kv_data.kv_arithmetic(SPEC, 2000, seed=1, keys='held_in')}
  held_out = {i for i, _ in kv_data.kv_arithmetic(SPEC, 500, seed=2, keys='held_out')}
  assert not train & held_out


def test_word_vocabulary_python_and_tensorflow_agree():
  vocab = kv_arithmetic.vocabulary(SPEC)
  text = 'k12 + k7 - 3 ='
  ids = vocab.encode(text)
  assert ids == kv_data.encode(text, kv_data.vocabulary(SPEC))
  np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), ids)
  assert vocab.decode(ids + [vocab.eos_id, 5]) == text
  assert vocab.decode_tf(tf.constant(ids + [vocab.eos_id])).numpy().decode() == text
  assert vocab.encode('k12 zebra') == [vocab.encode('k12')[0], vocab.unk_id]
  with pytest.raises(ValueError, match='unique'):
    WordVocabulary(['a', 'a'])


def test_registered_tasks_and_metric():
  names = set(seqio.TaskRegistry.names())
  assert set(kv_arithmetic.TASKS) <= names
  assert 'kv_arithmetic_eval' in seqio.MixtureRegistry.names()
  assert kv_arithmetic.accuracy(['1 2', '- 3'], ['1 2', '3'])['accuracy'] == 50.0


def test_greedy_decode_equals_the_argmax_loop_of_full_forwards():
  config = TransformerConfig(vocab_size=30, embed_dim=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=8, mlp_dim=32)
  model = Transformer(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 30, n)) for n in (3, 5)]
  length, steps = 12, 5
  tokens = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, 1:len(prompt) + 1] = prompt  # Shifted right: 0 first.
    mask[row, :len(prompt) + 1] = 1
  logits_fn = lambda t: model.apply({'params': params}, t).logits
  out = np.asarray(decoding.greedy_decode(logits_fn, jnp.asarray(tokens), jnp.asarray(mask),
                                          steps, eos_id=-1))
  for row, prompt in enumerate(prompts):
    sequence = [0] + list(prompt)
    for _ in range(steps):
      logits = model.apply({'params': params}, jnp.asarray([sequence])).logits
      sequence.append(int(jnp.argmax(logits[0, -1])))
    assert out[row].tolist() == sequence[len(prompt) + 1:]


def test_values_above_nine_are_single_tokens_and_results_are_digits():
  spec = kv_data.KVSpec(max_value=19)
  words = kv_data.vocabulary(spec)
  assert words.index('19') == words.index(kv_data.SUBSTITUTE) + 10
  assert words[-1] == f'k{spec.num_keys - 1}' and len(words) == len(set(words))
  repo = kv_data.key_values(spec)
  assert set(repo.values()) == set(range(20))
  index = {w: i for i, w in enumerate(words)}
  seen_large = False
  for inputs, targets in kv_data.numeric_arithmetic(spec, 300, seed=4):
    operands = inputs.split()[0:-1:2]
    seen_large |= any(int(x) > 9 for x in operands)
    assert kv_data.UNK not in [words[i] for i in kv_data.encode(inputs, index)]
    assert all(len(w) == 1 for w in targets.split()), targets  # '- 1 3': digits and sign.
    assert int(targets.replace(' ', '')) == eval(inputs[:-1])  # pylint: disable=eval-used
  assert seen_large
  for inputs, targets in kv_data.kv_substitution(spec, 50, seed=4):
    assert targets == ' '.join(str(repo[w]) if w in repo else w for w in inputs.split()[:-1])
  with pytest.raises(ValueError, match='Values must lie in'):
    kv_data.KVSpec(max_value=kv_data.MAX_VALUE + 1)


def test_the_augments_training_set_asks_both_ways_and_answers_the_substitution():
  repo = kv_data.key_values(SPEC)
  pairs = kv_arithmetic._examples(SPEC, 'kv_substitution_augment', 'train', 4000, 10)
  marks = [inputs.split()[-1] for inputs, _ in pairs]
  assert set(marks) == {kv_data.SUBSTITUTE, kv_data.EQUALS}
  assert abs(marks.count(kv_data.EQUALS) / len(marks) - 0.5) < 0.05
  keys = set()
  for inputs, targets in pairs:
    words = inputs.split()
    keys |= set(words[0:-1:2])
    assert targets == ' '.join(str(repo[w]) if w in repo else w for w in words[:-1])
  assert len(keys) == SPEC.num_keys  # All keys, held-out ones too: m_A knows every key.
  # The evaluation set of KV-Substitution asks with '->' only.
  assert {i.split()[-1] for i, _ in kv_arithmetic._examples(
      SPEC, 'kv_substitution', 'validation', 10, 500)} == {kv_data.SUBSTITUTE}
