"""Blocked (flash-style) attention: the mask built block by block, memory linear in length.

`dot_product_attention` takes a materialised [B, T, S] mask and keeps float32 [B, K, G, T, S]
logits and probabilities for the backward pass: quadratic in length. `blocked_attention` takes
what the masks are made of instead (`masks.attention_mask`'s indices or read keys, segments,
window, and an optional key mask) and walks the keys in blocks of `block_size` with an online
softmax (running maximum, normaliser and output per query). Its backward pass (a custom VJP)
keeps only the output and each query's softmax maximum and normaliser and recomputes every block's logits, so
neither pass holds more than [B, K, G, T, block_size] logits at a time.

It computes exactly `dot_product_attention(q, k, v, mask)` with
`mask = attention_mask(q_keys, kv_keys, q_segment_ids, kv_segment_ids, window) & kv_mask`,
including its convention for a query that sees no key (a padding row): the uniform average of
the values (masked logits are the finite float32 minimum, not -inf).

Einsum letters as in `calm_jax.attention`: B batch, T queries, S keys, K kv heads, G query heads
per kv head, H head dim, C a block of keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_MASKED = float(np.finfo(np.float32).min)


def _block_mask(q_keys, kv_keys, q_segments, kv_segments, kv_mask, window):
  """[B, T, C] visibility of one block of keys (`masks.attention_mask` & kv_mask)."""
  mask = kv_keys[:, None, :] <= q_keys[:, :, None]
  mask &= q_segments[:, :, None] == kv_segments[:, None, :]
  mask &= (kv_segments != 0)[:, None, :] & kv_mask[:, None, :]
  if window is not None:
    mask &= q_keys[:, :, None] - kv_keys[:, None, :] < window
  return mask


def _blocks(x: Array, block: int, fill) -> Array:
  """[B, S, ...] padded to a multiple of `block` with `fill`, as [S / block, B, block, ...]."""
  b, s = x.shape[:2]
  pad = -s % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((b, (s + pad) // block, block) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _logits(q5, k_block, mask, real, softcap):
  """Masked float32 logits [B, K, G, T, C] of one block and the soft-cap's tanh (or None).
  Keys added to fill the last block (`real` False) are -inf: they are not keys at all."""
  s = jnp.einsum('BTKGH,BCKH->BKGTC', q5, k_block)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(s / softcap)
    s = softcap * tanh
  s = jnp.where(mask[:, None, None], s, _MASKED)
  return jnp.where(real[:, None, None, None, :], s, -jnp.inf), tanh


def _online_softmax_step(m: Array, l: Array, acc: Array, s: Array,
                         v_block: Array) -> tuple[Array, Array, Array]:
  """One block of the online softmax: running maximum m and normaliser l [B, K, G, T] and
  output acc [B, K, G, T, H] (float32) updated with the block's logits s [B, K, G, T, C] and
  values [B, C, K, H]. Keys that are not keys (-inf) add nothing."""
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.exp(s - m_new[..., None])
  scale = jnp.exp(m - m_new)
  l = l * scale + p.sum(-1)
  acc = acc * scale[..., None] + jnp.einsum('BKGTC,BCKH->BKGTH', p.astype(v_block.dtype),
                                             v_block).astype(jnp.float32)
  return m_new, l, acc


def _prepare(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, block):
  b, t, n, h = q.shape
  heads = k.shape[2]
  q5 = q.reshape(b, t, heads, n // heads, h)
  real = jnp.ones(kv_keys.shape, bool)
  xs = (_blocks(k, block, 0), _blocks(v, block, 0), _blocks(kv_keys, block, 0),
        _blocks(kv_segments, block, 0), _blocks(kv_mask, block, False),
        _blocks(real, block, False))
  return q5, xs


def _forward(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, window, softcap,
             block):
  """(output [B, T, N, H], each query's running maximum and normaliser [B, K, G, T] float32;
  kept apart, not as a log-sum-exp, which loses the normaliser of a query that sees no key)."""
  b, t, n, h = q.shape
  q5, xs = _prepare(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, block)
  g = q5.shape[3]
  shape = (b, k.shape[2], g, t)

  def step(carry, x):
    m, l, acc = carry
    k_j, v_j, keys_j, segments_j, mask_j, real_j = x
    mask = _block_mask(q_keys, keys_j, q_segments, segments_j, mask_j, window)
    s, _ = _logits(q5, k_j, mask, real_j, softcap)
    return _online_softmax_step(m, l, acc, s, v_j), None

  init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (h,), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, xs)
  out = acc / l[..., None]
  out = jnp.einsum('BKGTH->BTKGH', out).reshape(b, t, n, h).astype(q.dtype)
  return out, (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, window, softcap,
               block):
  return _forward(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, window, softcap,
                  block)[0]


def _attention_fwd(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, window,
                   softcap, block):
  out, (m, l) = _forward(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, window,
                         softcap, block)
  return out, (q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, out, m, l)


def _attention_bwd(window, softcap, block, residuals, d_out):
  q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, out, m, l = residuals
  b, t, n, h = q.shape
  s_len, heads = k.shape[1], k.shape[2]
  g = n // heads
  q5, xs = _prepare(q, k, v, q_keys, kv_keys, q_segments, kv_segments, kv_mask, block)
  do5 = d_out.reshape(b, t, heads, g, h)
  # [B, K, G, T]: the softmax's rowwise correction, sum_h dO * O.
  delta = jnp.einsum('BTKGH,BTKGH->BKGT', do5.astype(jnp.float32),
                     out.reshape(b, t, heads, g, h).astype(jnp.float32))

  def step(dq, x):
    k_j, v_j, keys_j, segments_j, mask_j, real_j = x
    mask = _block_mask(q_keys, keys_j, q_segments, segments_j, mask_j, window)
    s, tanh = _logits(q5, k_j, mask, real_j, softcap)
    p = jnp.exp(s - m[..., None]) / l[..., None]  # The forward's probabilities, recomputed.
    dv = jnp.einsum('BKGTC,BTKGH->BCKH', p.astype(d_out.dtype), do5)
    dp = jnp.einsum('BTKGH,BCKH->BKGTC', do5, v_j).astype(jnp.float32)
    # Masked logits are constants: no gradient reaches q or k through them.
    ds = jnp.where(mask[:, None, None], p * (dp - delta[..., None]), 0.0)
    if softcap is not None:
      ds = ds * (1.0 - jnp.square(tanh))
    ds = ds.astype(q.dtype)
    dq = dq + jnp.einsum('BKGTC,BCKH->BTKGH', ds, k_j).astype(jnp.float32)
    dk = jnp.einsum('BKGTC,BTKGH->BCKH', ds, q5)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q5.shape, jnp.float32), xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :s_len]
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (dq.reshape(q.shape).astype(q.dtype), unblock(dk).astype(k.dtype),
          unblock(dv).astype(v.dtype), zero(q_keys), zero(kv_keys), zero(q_segments),
          zero(kv_segments), zero(kv_mask))


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: Array, k: Array, v: Array, q_keys: Array, kv_keys: Array,
                      q_segment_ids: Array, kv_segment_ids: Array, *,
                      window: int | None = None, softcap: float | None = None,
                      kv_mask: Array | None = None, block_size: int = 512) -> Array:
  """Grouped-query attention of scaled queries over keys in blocks (module docstring).

  Args:
    q: [B, T, N, H] queries, already scaled.
    k, v: [B, S, K, H] keys and values.
    q_keys: [B, T] int32 order of each query: its index, or its read key
      (`calm_jax.alignment`); a query sees keys whose `kv_keys` are at or below its own.
    kv_keys: [B, S] int32 the same for each key.
    q_segment_ids, kv_segment_ids: [B, T], [B, S]; 0 marks padding.
    window: a query sees keys less than `window` below it (sliding window), or None.
    softcap: `c * tanh(logits / c)` before masking, or None.
    kv_mask: [B, S] bool, False on keys no query may see (the bridges' prompt-only
      ablation), or None.
    block_size: keys per block (the last block is filled with keys that count as absent).

  Returns:
    [B, T, N, H], what `dot_product_attention` gives with the materialised mask.
  """
  if kv_mask is None:
    kv_mask = jnp.ones(kv_keys.shape, bool)
  block = max(1, min(int(block_size), k.shape[1]))
  as_int = lambda x: jnp.asarray(x, jnp.int32)
  return _attention(q, k, v, as_int(q_keys), as_int(kv_keys), as_int(q_segment_ids),
                    as_int(kv_segment_ids), jnp.asarray(kv_mask, bool), window, softcap, block)


def cached_attention(q: Array, k: Array, v: Array, mask, softcap: float | None = None) -> Array:
  """A decoding step's attention over the slots of a cache written so far, in blocks.

  Walks the first `mask.slots_in_use()` slots (a traced count: the loop's trip count follows
  the current length, not the cache's) in blocks of `mask.block_size` with an online softmax;
  slots past the longest row's index are never read. Forward only (decoding has no backward).
  Equals `dot_product_attention(q, k, v, mask.materialize(), softcap)` for every query that
  sees a slot (a decoding query always sees its own).

  Args:
    q: [B, T, N, H] queries of the new tokens, already scaled.
    k, v: [B, L, K, H] the cache (the new tokens already written).
    mask: a `masks.CacheMask` with a block size.
    softcap: `c * tanh(logits / c)` before masking, or None.

  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  slots, heads = k.shape[1], k.shape[2]
  block = max(1, min(int(mask.block_size), slots))
  q5 = q.reshape(b, t, heads, n // heads, h)
  shape = (b, heads, n // heads, t)
  in_use = mask.slots_in_use()

  def step(j, carry):
    m, l, acc = carry
    start = j * block
    # The last block may overhang the cache: it is read from `slots - block` on and the
    # slots an earlier block already read are left out.
    first = jnp.minimum(start, slots - block)
    index = first + jnp.arange(block)
    k_j = jax.lax.dynamic_slice_in_dim(k, first, block, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v, first, block, axis=1)
    real = (index >= start) & (index < in_use)
    v_j = jnp.where(real[None, :, None, None], v_j, 0)  # Slots not in use are never read.
    visible = mask.visible(index)
    s, _ = _logits(q5, k_j, visible, jnp.broadcast_to(real, (b, block)), softcap)
    return _online_softmax_step(m, l, acc, s, v_j)

  init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (h,), jnp.float32))
  num_blocks = (in_use + block - 1) // block
  m, l, acc = jax.lax.fori_loop(0, num_blocks, step, init)
  out = acc / l[..., None]
  return jnp.einsum('BKGTH->BTKGH', out).reshape(b, t, n, h).astype(q.dtype)
