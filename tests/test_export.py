"""Composed checkpoints and serving artifacts reproduce the in-process model's tokens exactly."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf

import calm_jax
from calm_jax import composed, decoding
from calm_jax.checkpoints import CheckpointError
from calm_jax.calm import Calm
from calm_tasks.vocabularies import WordVocabulary

from test_calm import VOCAB, init, make_config

MAX_DECODE = 5
# A word vocabulary of the composition's size: 3 specials + VOCAB - 3 words.
VOCABULARY = WordVocabulary([f'w{i}' for i in range(VOCAB - 3)])
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]


@pytest.fixture(scope='module')
def model():
  config = make_config(zero_init=False)
  return config, init(config)


@pytest.fixture(scope='module')
def expected(model):
  """Tokens of the in-process model: greedy, and sampling with top-k."""
  config, params = model
  tokens, mask = composed.prompt_arrays(PROMPTS)
  greedy = decoding.make_generate_fn(Calm(config), max_decode_len=MAX_DECODE,
                                     eos_id=VOCABULARY.eos_id)
  return np.asarray(greedy(params, tokens, mask, jax.random.key(0)))


@pytest.fixture(scope='module')
def exported(model, tmp_path_factory):
  config, params = model
  path = tmp_path_factory.mktemp('export') / 'composed'
  composed.save_composed(path, config, params, vocabulary=VOCABULARY, metadata={'step': 7})
  return path


def test_composed_checkpoint_round_trip(model, exported, expected):
  config, params = model
  loaded = calm_jax.load_composed(exported)
  assert loaded.config == config
  assert loaded.metadata['step'] == 7
  assert loaded.vocabulary == VOCABULARY
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  tokens, mask = composed.prompt_arrays(PROMPTS)
  np.testing.assert_array_equal(loaded.generate(tokens, mask, max_decode_len=MAX_DECODE),
                                expected)
  texts = loaded.generate_text([VOCABULARY.decode(p) for p in PROMPTS],
                               max_decode_len=MAX_DECODE)
  for text, row in zip(texts, expected):
    assert text == VOCABULARY.decode(row.tolist())


def test_serving_artifacts_reproduce_the_tokens(exported, expected):
  loaded = composed.load_composed(exported)
  tokens, mask = composed.prompt_arrays(PROMPTS)
  signature = composed.export_serving(exported, loaded, prompt_length=tokens.shape[1],
                                      max_decode_len=MAX_DECODE, eos_id=VOCABULARY.eos_id,
                                      saved_model=True)
  assert signature['output'] == ['b', MAX_DECODE, 'int32']
  assert json.loads((exported / 'serving' / 'signature.json').read_text()) == signature
  serve = composed.load_serving(exported)
  key = jax.random.key_data(jax.random.key(0))
  np.testing.assert_array_equal(serve(loaded.params, tokens, mask, key), expected)
  # The batch size is symbolic: other batch sizes run through the same artifact.
  np.testing.assert_array_equal(serve(loaded.params, tokens[:2], mask[:2], key), expected[:2])
  np.testing.assert_array_equal(serve(loaded.params, tokens[2:], mask[2:], key), expected[2:])

  saved = tf.saved_model.load(str(exported / 'serving' / 'saved_model'))
  out = saved.signatures['serving_default'](input_tokens=tf.constant(tokens),
                                            prompt_mask=tf.constant(mask),
                                            key_data=tf.constant([0, 0], tf.uint32))
  np.testing.assert_array_equal(out['tokens'].numpy(), expected)
  out = saved.signatures['serving_default'](input_tokens=tf.constant(tokens[1:]),
                                            prompt_mask=tf.constant(mask[1:]),
                                            key_data=tf.constant([0, 0], tf.uint32))
  np.testing.assert_array_equal(out['tokens'].numpy(), expected[1:])


def test_existing_directory_is_refused(model, exported):
  config, params = model
  with pytest.raises(CheckpointError, match='already holds'):
    composed.save_composed(exported, config, params)


def test_missing_and_incomplete_checkpoints_are_named(tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    composed.load_composed(tmp_path / 'nowhere')
  (tmp_path / 'half').mkdir()
  with pytest.raises(CheckpointError, match='no calm.json'):
    composed.load_composed(tmp_path / 'half')
  with pytest.raises(CheckpointError, match='serving artifact'):
    composed.load_serving(tmp_path / 'half')


def test_wrong_shapes_are_named(model, exported, tmp_path):
  config, params = model
  bad = tmp_path / 'bad'
  composed.save_composed(bad, config, params)
  document = json.loads((bad / 'calm.json').read_text())
  document['config']['anchor']['mlp_dim'] += 1
  (bad / 'calm.json').write_text(json.dumps(document))
  with pytest.raises(CheckpointError, match=r"anchor.*layer_0.*mlp.*shape"):
    composed.load_composed(bad)
  document['format'] = 'something/9'
  (bad / 'calm.json').write_text(json.dumps(document))
  with pytest.raises(CheckpointError, match='unknown format'):
    composed.load_composed(bad)
  with pytest.raises(CheckpointError, match='do not match'):
    composed.save_composed(tmp_path / 'other', config, {'anchor': params['anchor']})
