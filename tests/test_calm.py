"""The composition: identity at init, causality, padding, packing, the paper's rule, bad configs."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import calm as calm_lib
from calm_jax.masks import attention_mask
from calm_jax.calm import Calm
from calm_jax.configs import (BridgeConfig, CalmConfig, TransformerConfig, paper_bridge,
                              paper_connections)
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer

VOCAB = 53
ANCHOR = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=4, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=48,
                           attention_types=('local', 'global') * 2, sliding_window=3)
AUGMENT = TransformerConfig(vocab_size=VOCAB, embed_dim=24, num_layers=8, num_heads=3,
                            num_kv_heads=1, head_dim=8, mlp_dim=40)
SECOND = TransformerConfig(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2,
                           num_kv_heads=2, head_dim=8, mlp_dim=24)


def make_config(zero_init=True, **kwargs):
  """Two augments, GQA cross-attention, two bridges after the same anchor layer."""
  return CalmConfig(
      anchor=ANCHOR, augments={'kv': AUGMENT, 'aux': SECOND},
      bridges={'kv': BridgeConfig(num_kv_heads=2, zero_init_out=zero_init),
               'aux': BridgeConfig(connections=((1, 2), (2, 4)), zero_init_out=zero_init,
                                   rope_base=10_000.0)},
      **kwargs)


def init(config, seed=0):
  """Random frozen models (numpy, fast) and bridges from their real initialiser."""
  abstract = nn.unbox(calm_lib.abstract_params(config))
  params = random_like({'anchor': abstract['anchor'], 'augments': abstract['augments']}, seed)
  params.update(calm_lib.init_bridge_params(config, jax.random.key(seed)))
  return params


@functools.lru_cache(maxsize=None)
def _jitted_apply(config):
  return jax.jit(lambda params, tokens, **kw: Calm(config).apply({'params': params}, tokens,
                                                                 **kw).logits)


def logits(config, params, tokens, **kwargs):
  kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
  return np.asarray(_jitted_apply(config)(params, jnp.asarray(tokens), **kwargs))


@pytest.fixture(scope='module')
def live():
  """A composition with random non-zero bridges."""
  config = make_config(zero_init=False)
  return config, init(config)


def test_parameter_tree_layout():
  params = init(make_config())
  assert set(params) == {'anchor', 'augments', 'bridge'}
  assert set(params['augments']) == {'kv', 'aux'}
  assert set(params['bridge']['kv']) == {'block_0', 'block_1'}
  assert set(params['bridge']['kv']['block_0']) == {'proj', 'query', 'key', 'value', 'out',
                                                    'query_norm', 'kv_norm'}
  assert params['bridge']['kv']['block_0']['proj'].shape == (24, 32)
  assert params['bridge']['kv']['block_0']['key'].shape == (32, 2, 8)  # GQA: 2 kv heads


def test_zero_init_composition_is_exactly_the_anchor():
  config = make_config()
  params = init(config)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
  anchor = jax.jit(lambda p, t: Transformer(ANCHOR).apply({'params': p}, t).logits)
  np.testing.assert_array_equal(logits(config, params, tokens),
                                np.asarray(anchor(params['anchor'], jnp.asarray(tokens))))


def test_live_bridges_change_the_logits(live):
  config, params = live
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
  anchor = Transformer(ANCHOR).apply({'params': params['anchor']}, jnp.asarray(tokens))
  assert np.abs(logits(config, params, tokens) - np.asarray(anchor.logits)).max() > 1e-2


def _first_changed_position(config, params, tokens, t):
  changed = tokens.copy()
  changed[:, t] = (changed[:, t] + 7) % VOCAB
  diff = np.abs(logits(config, params, tokens) - logits(config, params, changed)).max(axis=(0, 2))
  return int(np.argmax(diff > 0)), diff


@pytest.mark.parametrize('t', [0, 3, 7])
def test_causal(live, t):
  config, params = live
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 10))
  first, diff = _first_changed_position(config, params, tokens, t)
  assert first == t and diff[t] > 1e-4
  np.testing.assert_array_equal(diff[:t], 0)


def test_causality_test_catches_a_non_causal_cross_mask(live, monkeypatch):
  """Control: the same check fails once the cross-attention mask loses its causal part."""
  config, params = live

  def leaky_mask(segment_ids, prompt_mask=None, block_size=None):
    del prompt_mask, block_size
    index = jnp.zeros_like(segment_ids)  # Every key 'at or before' every query.
    return attention_mask(index, index, segment_ids, segment_ids)

  monkeypatch.setattr(calm_lib.masks, 'cross_mask', leaky_mask)
  _jitted_apply.cache_clear()  # Retrace with the leaky mask, and afterwards without it.
  try:
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 10))
    first, _ = _first_changed_position(config, params, tokens, 7)
  finally:
    _jitted_apply.cache_clear()
  assert first < 7


def test_padding_changes_no_real_logit(live):
  config, params = live
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, VOCAB, (2, 6))
  padded = np.concatenate([tokens, rng.integers(0, VOCAB, (2, 4))], axis=1)
  segments = (np.arange(10) < 6).astype(np.int32)[None].repeat(2, 0)
  np.testing.assert_allclose(logits(config, params, padded, segment_ids=segments)[:, :6],
                             logits(config, params, tokens), atol=1e-5, rtol=0)


def test_packing_equals_running_apart(live):
  config, params = live
  rng = np.random.default_rng(3)
  first, second = rng.integers(0, VOCAB, 4), rng.integers(0, VOCAB, 6)
  packed = np.concatenate([first, second])[None]
  segments = np.asarray([[1] * 4 + [2] * 6])
  positions = np.asarray([list(range(4)) + list(range(6))])
  out = logits(config, params, packed, segment_ids=segments, positions=positions)[0]
  np.testing.assert_allclose(out[:4], logits(config, params, first[None])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[4:], logits(config, params, second[None])[0], atol=1e-5, rtol=0)


def test_augment_as_encoder_reads_only_the_prompt(live):
  config, params = live
  encoder = dataclasses.replace(config, augment_as_encoder=True)
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, VOCAB, (1, 8))
  prompt = (np.arange(8) < 3).astype(np.int32)[None]
  changed = tokens.copy()
  changed[0, 5] = (changed[0, 5] + 1) % VOCAB
  # Only the anchor sees token 5: with a 3-token prompt, the augment's view stays the same,
  # so the composed logits after position 5 differ exactly as the anchor's do.
  a = logits(encoder, params, tokens, prompt_mask=prompt)
  b = logits(encoder, params, changed, prompt_mask=prompt)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  with pytest.raises(ValueError, match='prompt_mask'):
    logits(encoder, params, tokens)
  # Prompt-only bridges differ from the refreshed ones past the prompt, not within it.
  full = logits(config, params, tokens)
  np.testing.assert_allclose(a[:, :3], full[:, :3], atol=1e-6, rtol=0)
  assert np.abs(a[:, 3:] - full[:, 3:]).max() > 1e-4


def test_paper_rule_24_32_every_4():
  # n = 24 // 4 = 6; L_A = {4, 8, ..., 24}; L_B = {round(j * 32 / 6)} = {5, 11, 16, 21, 27, 32}.
  assert paper_connections(24, 32, 4) == ((4, 5), (8, 11), (12, 16), (16, 21), (20, 27),
                                          (24, 32))
  config = CalmConfig(anchor=dataclasses.replace(ANCHOR, num_layers=32, attention_types=()),
                      augments={'m_a': dataclasses.replace(AUGMENT, num_layers=24)})
  assert config.connections('m_a') == paper_connections(24, 32)
  assert config.bridge('m_a') == BridgeConfig()


def test_paper_preset_has_no_norms():
  bridge = paper_bridge()
  assert not bridge.use_query_norm and not bridge.use_kv_norm and bridge.zero_init_out
  config = CalmConfig(anchor=ANCHOR, augments={'kv': AUGMENT}, bridges={'kv': bridge})
  block = init(config)['bridge']['kv']['block_0']
  assert set(block) == {'proj', 'query', 'key', 'value', 'out'}


@pytest.mark.parametrize('kwargs,message', [
    (dict(bridges={'kv': BridgeConfig(connections=((9, 1),))}), r'augment layer 9, outside 1\.\.8'),
    (dict(bridges={'kv': BridgeConfig(connections=((1, 5),))}), r'anchor layer 5, outside 0\.\.4'),
    (dict(bridges={'kv': BridgeConfig(num_heads=5)}), 'heads .5. do not divide the anchor width'),
    (dict(bridges={'kv': BridgeConfig(num_kv_heads=3)}), 'num_kv_heads .3. must divide'),
    (dict(bridges={'nope': BridgeConfig()}), r"unknown augment\(s\) \['nope'\]"),
    (dict(bridges={'kv': BridgeConfig(every=9)}), 'every=9 exceeds the augment depth 8'),
    (dict(augments={'kv': dataclasses.replace(AUGMENT, vocab_size=7)}), 'own_tokenizer'),
    (dict(own_tokenizer=('nope',)), r"own_tokenizer names unknown augment\(s\) \['nope'\]"),
    (dict(own_tokenizer=('kv',), bridges={'kv': BridgeConfig(rope_base=10_000.0)}),
     'cannot use rope_base'),
    (dict(augments={'bad-name': AUGMENT}), 'identifier'),
    (dict(augments={}), 'at least one augment'),
])
def test_bad_config_fails_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    CalmConfig(**{'anchor': ANCHOR, 'augments': {'kv': AUGMENT}, **kwargs})


def test_unknown_augment_lookup_is_named():
  with pytest.raises(KeyError, match='nope'):
    make_config().bridge('nope')


def test_bridge_into_the_anchor_embedding(live):
  """Anchor layer 0 (the embedding) is a valid target: every anchor layer then sees it."""
  config, params = live
  config0 = CalmConfig(anchor=ANCHOR, augments={'kv': AUGMENT},
                       bridges={'kv': BridgeConfig(connections=((2, 0),), zero_init_out=False)})
  params0 = init(config0, seed=5)
  tokens = np.random.default_rng(6).integers(0, VOCAB, (1, 7))
  anchor = jax.jit(lambda p, t: Transformer(ANCHOR).apply({'params': p}, t).logits)
  out = logits(config0, params0, tokens)
  assert np.abs(out - np.asarray(anchor(params0['anchor'], jnp.asarray(tokens)))).max() > 1e-3
  first, _ = _first_changed_position(config0, params0, tokens, 4)
  assert first == 4  # Still causal.
