"""Blocked attention equals the materialised-mask attention, values and gradients (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.attention import dot_product_attention
from calm_jax.blocked_attention import blocked_attention
from calm_jax.masks import attention_mask


def _inputs(seed, b=2, t=37, s=37, n=4, kv=2, h=8, ragged=True, packed=False):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h)) * 0.7
  k = jax.random.normal(keys[1], (b, s, kv, h)) * 0.7
  v = jax.random.normal(keys[2], (b, s, kv, h))
  q_index = np.broadcast_to(np.arange(t), (b, t)).copy()
  kv_index = np.broadcast_to(np.arange(s), (b, s)).copy()
  q_seg, kv_seg = np.ones((b, t), np.int32), np.ones((b, s), np.int32)
  if ragged:  # Row 1 is padded: its last 9 queries and keys are padding.
    q_seg[1, t - 9:] = 0
    kv_seg[1, s - 9:] = 0
  if packed:  # Row 0 holds two sequences.
    q_seg[0, 15:] = 2
    kv_seg[0, 15:] = 2
  return q, k, v, q_index, kv_index, q_seg, kv_seg, keys[3]


def _reference(q, k, v, q_keys, kv_keys, q_seg, kv_seg, window=None, softcap=None,
               kv_mask=None):
  mask = attention_mask(jnp.asarray(q_keys), jnp.asarray(kv_keys), jnp.asarray(q_seg),
                        jnp.asarray(kv_seg), window)
  if kv_mask is not None:
    mask &= jnp.asarray(kv_mask)[:, None, :]
  return dot_product_attention(q, k, v, mask, softcap)


def _check(args, rng, **kwargs):
  q, k, v, q_keys, kv_keys, q_seg, kv_seg = args
  blocked = lambda q, k, v, block: blocked_attention(q, k, v, q_keys, kv_keys, q_seg, kv_seg,
                                                     block_size=block, **kwargs)
  reference = lambda q, k, v: _reference(q, k, v, q_keys, kv_keys, q_seg, kv_seg, **kwargs)
  expected = reference(q, k, v)
  cotangent = jax.random.normal(rng, expected.shape)
  grads = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
  for block in (1, 8, 16, 64):  # Dividing the keys or not; one block holding them all.
    got = jax.jit(blocked, static_argnums=3)(q, k, v, block)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f'block {block}')
    got_grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blocked(q, k, v, block) * cotangent),
                                 argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip('qkv', got_grads, grads):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f'd{name}, block {block}')


@pytest.mark.parametrize('window,softcap', [(None, None), (7, None), (None, 2.5), (5, 1.5)])
def test_blocked_attention_equals_the_materialised_mask(window, softcap):
  *args, rng = _inputs(0, packed=True)
  _check(args, rng, window=window, softcap=softcap)


def test_blocked_attention_with_read_keys_and_a_key_mask():
  # Two tokenizations of one text (the bridges of an own-tokenizer augment): queries and keys
  # ordered by read keys, not indices, and the prompt-only ablation's key mask.
  q, k, v, _, _, q_seg, kv_seg, rng = _inputs(1, t=29, s=19, n=2, kv=1)
  gen = np.random.default_rng(0)
  q_keys = np.cumsum(gen.integers(1, 4, (2, 29)), axis=1) * 1024
  kv_keys = np.cumsum(gen.integers(2, 7, (2, 19)), axis=1) * 1024
  q_keys[:, 0] = kv_keys[:, 0] = 0
  kv_mask = np.arange(19)[None, :] < np.asarray([[11], [7]])
  q_seg = np.ones((2, 29), np.int32)
  kv_seg = np.ones((2, 19), np.int32)
  kv_seg[1, 15:] = 0
  _check((q, k, v, q_keys, kv_keys, q_seg, kv_seg), rng, kv_mask=kv_mask)


def test_a_query_that_sees_no_key_averages_the_values_as_the_reference_does():
  q, k, v, q_keys, kv_keys, q_seg, kv_seg, rng = _inputs(2, ragged=True)
  assert (q_seg == 0).any()  # Padding queries see no key.
  _check((q, k, v, q_keys, kv_keys, q_seg, kv_seg), rng)


def test_the_blocks_bound_the_logits_kept_for_the_backward_pass():
  # At 1024 keys the reference keeps [B, K, G, T, S] float32 probabilities for the backward
  # pass; the blocked kernel keeps [B, T, N, H]-sized tensors and recomputes the blocks.
  b, t, n, h = 1, 1024, 4, 16
  q = jnp.zeros((b, t, n, h))
  kv = jnp.zeros((b, t, n, h))
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)

  def residual_bytes(f):
    _, vjp = jax.vjp(f, q, kv, kv)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp)
               if hasattr(x, 'dtype') and x.dtype != jax.dtypes.float0)

  blocked = residual_bytes(lambda q, k, v: blocked_attention(q, k, v, index, index, seg, seg,
                                                             block_size=128))
  reference = residual_bytes(lambda q, k, v: _reference(q, k, v, index, index, seg, seg))
  logits_bytes = b * n * t * t * 4
  assert reference >= logits_bytes  # The probabilities (and more) are kept.
  assert blocked < logits_bytes / 8, (blocked, logits_bytes)


def _lm_config(**kwargs):
  from calm_jax.configs import TransformerConfig  # pylint: disable=g-import-not-at-top
  return TransformerConfig(**{**dict(
      vocab_size=97, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=64, attention_types=('local', 'global', 'local'), sliding_window=5,
      attn_logit_softcap=3.0, final_logit_softcap=20.0, norm_plus_one=True,
      sandwich_norms=True, activation='gelu_tanh', dtype='float32'), **kwargs})


def _close(a, b):
  """Equal to float32 rounding at the tensor's own scale (these gradients reach ~60)."""
  b = np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def _packed_tokens(vocab, b=2, t=24):
  tokens = np.array(jax.random.randint(jax.random.key(5), (b, t), 1, vocab))
  segments = np.ones((b, t), np.int32)
  segments[0, 10:] = 2  # Two sequences in row 0; row 1 padded.
  segments[1, 19:] = 0
  positions = np.concatenate([np.arange(10), np.arange(t - 10)])[None].repeat(b, 0)
  positions[1] = np.arange(t)
  tokens[segments == 0] = 0
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


def test_a_transformer_with_blocked_attention_is_the_same_model():
  from calm_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
  config = _lm_config()
  tokens, positions, segments = _packed_tokens(config.vocab_size)
  params = Transformer(config).init(jax.random.key(0), tokens)['params']
  weights = jax.random.normal(jax.random.key(6), tokens.shape + (config.vocab_size,))

  def run(block):
    model = Transformer(config, attention_block_size=block)
    f = lambda p: model.apply({'params': p}, tokens, positions, segments).logits
    loss = lambda p: jnp.sum(f(p) * weights * (segments > 0)[..., None])
    # The blocked kernel is what runs (and only then).
    assert ('custom_vjp_call' in str(jax.make_jaxpr(f)(params))) == (block is not None)
    return f(params), jax.grad(loss)(params)

  expected, expected_grads = run(None)
  for block in (4, 7, 64):  # Smaller than the window, not dividing the length, all at once.
    logits, grads = run(block)
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected)[real],
                               rtol=1e-5, atol=1e-5)
    jax.tree.map(_close, grads, expected_grads)


@pytest.mark.parametrize('encoder', [False, True])
def test_a_composition_with_blocked_attention_is_the_same_model(encoder):
  from calm_jax.calm import Calm  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import BridgeConfig, CalmConfig  # pylint: disable=g-import-not-at-top
  config = CalmConfig(anchor=_lm_config(), augments={'aug': _lm_config(embed_dim=16)},
                      bridges={'aug': BridgeConfig(connections=((1, 1), (3, 3)),
                                                   zero_init_out=False)},
                      augment_as_encoder=encoder)
  tokens, positions, segments = _packed_tokens(97)
  prompt = jnp.asarray((np.arange(24) < 14)[None].repeat(2, 0).astype(np.int32))
  params = Calm(config).init(jax.random.key(0), tokens, prompt_mask=prompt)['params']
  weights = jax.random.normal(jax.random.key(6), tokens.shape + (97,))

  def run(block):
    model = Calm(config, attention_block_size=block)
    f = lambda b: model.apply({'params': {**params, 'bridge': b}}, tokens, positions, segments,
                              prompt_mask=prompt).logits
    loss = lambda b: jnp.sum(f(b) * weights * (segments > 0)[..., None])
    jaxpr = str(jax.make_jaxpr(f)(params['bridge']))
    # Blocked: every attention (3 + 3 layers, 2 bridges) runs the blocked kernel.
    assert jaxpr.count('custom_vjp_call') == (8 if block else 0), jaxpr.count('custom_vjp_call')
    return f(params['bridge']), jax.grad(loss)(params['bridge'])

  expected, expected_grads = run(None)
  logits, grads = run(6)
  real = np.asarray(segments) > 0
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected)[real],
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(_close, grads, expected_grads)
  # Prefill (decoding's first step) too.
  prefill = lambda block: Calm(config, attention_block_size=block).apply(
      {'params': params}, tokens, prompt, cache_length=32, method=Calm.prefill)
  np.testing.assert_allclose(prefill(6).logits, prefill(None).logits, rtol=1e-5, atol=1e-5)
