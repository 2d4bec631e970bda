"""Identities of the transformer itself: masks, padding, packing, config checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.masks import attention_mask
from calm_jax.configs import RopeScaling, TransformerConfig
from calm_jax.transformer import Transformer

CONFIG = TransformerConfig(
    vocab_size=61, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=48, attention_types=('local', 'global', 'local'), sliding_window=3, qk_norm=True,
    sandwich_norms=True, norm_plus_one=True, attn_logit_softcap=20.0, tie_embeddings=False,
    rope_scaling=RopeScaling('linear', 2.0))


@pytest.fixture(scope='module')
def params():
  return jax.jit(Transformer(CONFIG).init)(jax.random.key(0),
                                          jnp.zeros((1, 4), jnp.int32))['params']


@jax.jit
def _apply(params, tokens, positions=None, segment_ids=None):
  return Transformer(CONFIG).apply({'params': params}, tokens, positions=positions,
                                   segment_ids=segment_ids).logits


def _logits(params, tokens, **kwargs):
  return np.asarray(_apply(params, jnp.asarray(tokens),
                           **{k: jnp.asarray(v) for k, v in kwargs.items()}))


def test_mask_is_causal_windowed_and_segmented():
  index = jnp.arange(5)[None]
  segments = jnp.asarray([[1, 1, 1, 2, 0]])
  mask = np.asarray(attention_mask(index, index, segments, segments, window=2))[0]
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_padding_changes_no_real_logit(params):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CONFIG.vocab_size, (2, 7))
  padded = np.concatenate([tokens, rng.integers(0, CONFIG.vocab_size, (2, 5))], axis=1)
  segments = np.concatenate([np.ones((2, 7), np.int32), np.zeros((2, 5), np.int32)], axis=1)
  np.testing.assert_allclose(_logits(params, padded, segment_ids=segments)[:, :7],
                             _logits(params, tokens), atol=1e-5, rtol=0)


def test_packing_equals_running_apart(params):
  rng = np.random.default_rng(2)
  first, second = rng.integers(0, CONFIG.vocab_size, 5), rng.integers(0, CONFIG.vocab_size, 6)
  packed = np.concatenate([first, second])[None]
  segments = np.asarray([[1] * 5 + [2] * 6])
  positions = np.asarray([list(range(5)) + list(range(6))])
  out = _logits(params, packed, positions=positions, segment_ids=segments)[0]
  np.testing.assert_allclose(out[:5], _logits(params, first[None])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[5:], _logits(params, second[None])[0], atol=1e-5, rtol=0)


def test_future_tokens_change_nothing_before_them(params):
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, CONFIG.vocab_size, (1, 9))
  changed = tokens.copy()
  changed[0, 6] = (changed[0, 6] + 1) % CONFIG.vocab_size
  a, b = _logits(params, tokens), _logits(params, changed)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_bfloat16_compute_runs_in_bfloat16(params):
  config = dataclasses.replace(CONFIG, dtype='bfloat16')
  tokens = jnp.zeros((1, 4), jnp.int32)
  out = Transformer(config).apply({'params': params}, tokens, return_hidden=(1,))
  assert out.hidden[1].dtype == jnp.bfloat16
  assert out.logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(out.logits)).all()


def test_return_hidden_out_of_range(params):
  with pytest.raises(ValueError, match=r'return_hidden \[4\]'):
    Transformer(CONFIG).apply({'params': params}, jnp.zeros((1, 2), jnp.int32),
                              return_hidden=(4,))


def test_config_json_round_trip():
  assert TransformerConfig.from_json(CONFIG.to_json()) == CONFIG


@pytest.mark.parametrize('change,message', [
    (dict(num_kv_heads=3), 'num_kv_heads'),
    (dict(attention_types=('local',)), 'attention_types has 1 entries for 3 layers'),
    (dict(sliding_window=None), 'local attention layers need a sliding_window'),
    (dict(activation='relu'), 'activation'),
    (dict(head_dim=15), 'head_dim'),
    (dict(dtype='float8'), 'dtype'),
])
def test_bad_config_is_rejected(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CONFIG, **change)


def test_unknown_json_field_is_rejected():
  with pytest.raises(ValueError, match='max_seq_len'):
    TransformerConfig.from_dict({**CONFIG.to_dict(), 'max_seq_len': 8})


def test_every_parameter_has_logical_axes():
  boxed = Transformer(CONFIG).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == len(jax.tree.leaves(nn.unbox(boxed)))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= {'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp'}


def test_parameter_names_mirror_the_importer(params):
  assert set(params) == {'embedder', 'final_norm', 'layer_0', 'layer_1', 'layer_2'}
  assert set(params['layer_0']['attn']) == {'query', 'key', 'value', 'out', 'query_norm',
                                            'key_norm'}


@pytest.mark.parametrize('spec,x_shape,k_shape', [
    ('BTD,DNH->BTNH', (2, 5, 8), (8, 3, 4)), ('BTNH,NHD->BTD', (2, 5, 3, 4), (3, 4, 8)),
    ('BTI,IO->BTO', (3, 4, 6), (6, 7)), ('BTD,VD->BTV', (2, 3, 8), (11, 8))])
def test_dense_is_the_einsum_and_so_is_its_gradient(spec, x_shape, k_shape):
  from calm_jax.layers import dense  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), k_shape)
  np.testing.assert_allclose(dense(spec, x, kernel), jnp.einsum(spec, x, kernel),
                             rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(spec, a, b)))
  ours = jax.grad(loss(dense), argnums=(0, 1))(x, kernel)
  reference = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='projection'):
    dense('BTD,BD->BT', x[..., :8] if x.ndim == 3 else x, kernel)
