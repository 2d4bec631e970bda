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
