"""Self-attention with GQA, RoPE, soft-capping and a KV cache; the dot-product attention kernel.

Einsum letters: B batch, T query length, S key length, D width, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, L cache length.

Masks come from the caller (`calm_jax.masks`). KV cache (decoding): {'keys', 'values'} of
[B, L, K, H] (keys after RoPE), a ring: the token at sequence index q of its row is in slot
q mod L (`masks.CacheMask`). A global layer's cache has a slot per index (prompt + tokens to
decode), so slot s holds index s; a sliding-window layer's may have only its window's slots
(`ring_cache`), each step overwriting the token that left the window. Without a cache,
attention returns its own keys and values [B, T, K, H] (a prefill makes them a cache with
`pad_cache` or `ring_cache`); with one, it writes each row's new token at the slot its
`CacheMask` gives and attends the cache under it. Slots past a row's index may hold stale values
from a padded prefill: the masks never let a step read them before the step that overwrites them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import lora, masks, partitioning
from calm_jax.blocked_attention import blocked_attention, cached_attention
from calm_jax.layers import RMSNorm, apply_rope, dense

Array = jax.Array

# Finite, so that a query with no visible key (a padding row) yields a uniform softmax, not NaN.
_MASKED = float(np.finfo(np.float32).min)


def write_cache(cache: dict[str, Array], keys: Array, values: Array,
                index: Array) -> dict[str, Array]:
  """Writes new positions per row: `keys`/`values` [B, K, Kv, H] at slots `index` [B] (one
  position, K = 1) or [B, K]; a slot outside the cache is dropped."""
  index = index[:, None] if index.ndim == 1 else index
  rows = jnp.arange(keys.shape[0])[:, None]
  return {'keys': cache['keys'].at[rows, index].set(keys.astype(cache['keys'].dtype),
                                                    mode='drop'),
          'values': cache['values'].at[rows, index].set(values.astype(cache['values'].dtype),
                                                        mode='drop')}


def pad_cache(keys: Array, values: Array, cache_length: int) -> dict[str, Array]:
  """A cache of `cache_length` slots holding prefill keys/values [B, T, K, H] in slots 0..T-1."""
  if keys.shape[1] > cache_length:
    raise ValueError(f'prefill length {keys.shape[1]} exceeds cache length {cache_length}.')
  pad = ((0, 0), (0, cache_length - keys.shape[1]), (0, 0), (0, 0))
  return {'keys': jnp.pad(keys, pad), 'values': jnp.pad(values, pad)}


def ring_cache(keys: Array, values: Array, last: Array, slots: int) -> dict[str, Array]:
  """A ring cache of `slots` slots from prefill keys/values [B, T, K, H]: slot s holds the
  latest index q <= last[b] with q mod slots = s (zeros where there is none), so each row's
  last `slots` prompt tokens up to `last` [B] are kept and a padded prompt's stale tail is
  never written."""
  s = jnp.arange(slots)[None, :]
  index = last[:, None] - jnp.mod(last[:, None] - s, slots)  # [B, slots]
  rows = jnp.arange(keys.shape[0])[:, None]
  keep = (index >= 0)[:, :, None, None]
  take = lambda x: jnp.where(keep, x[rows, jnp.clip(index, 0, x.shape[1] - 1)], 0)
  return {'keys': take(keys), 'values': take(values)}


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array,
                          softcap: float | None = None) -> Array:
  """Grouped-query attention of scaled queries; softmax in (at least) float32.

  Args:
    q: [B, T, N, H] queries, already scaled.
    k: [B, S, K, H] keys.
    v: [B, S, K, H] values.
    mask: [B, T, S] boolean.
    softcap: `c * tanh(logits / c)` before masking, or None.

  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  # [B, K, G, T, S]
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # [B, T, K, G, H]
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v)
  return out.reshape(b, t, n, h)


def attend(q: Array, k: Array, v: Array, mask: Any, softcap: float | None = None) -> Array:
  """`dot_product_attention` over a [B, T, S] mask; blocked attention over a
  `masks.KeyedMask` (same result, memory linear in length); over a `masks.CacheMask`, the
  cache's written slots in blocks when it has a block size (same result, cost following the
  current length), else all slots."""
  if isinstance(mask, masks.CacheMask):
    q = partitioning.constrain_query_to_cache(q, k.shape)  # On a mesh: as the cache splits.
    # A cache of one block or less is one block either way: read whole, without a loop.
    if mask.block_size and mask.slots > mask.block_size:
      return cached_attention(q, k, v, mask, softcap)
    return dot_product_attention(q, k, v, mask.materialize(), softcap)
  if isinstance(mask, masks.KeyedMask):
    return blocked_attention(q, k, v, mask.q_keys, mask.kv_keys, mask.q_segment_ids,
                             mask.kv_segment_ids, window=mask.window, softcap=softcap,
                             kv_mask=mask.kv_mask, block_size=mask.block_size)
  return dot_product_attention(q, k, v, mask, softcap)


class SelfAttention(nn.Module):
  """Multi-head self-attention of one decoder layer.

  Attributes:
    embed_dim: D.
    num_heads: N.
    num_kv_heads: K.
    head_dim: H.
    query_scale: multiplier of the queries (usually H ** -0.5).
    inv_freq: rotary inverse frequencies [H // 2] of this layer.
    softcap: attention logit soft-cap, or None.
    qk_norm: RMSNorm over H of queries and keys before RoPE.
    norm_eps: epsilon of those norms.
    norm_plus_one: `1 + w` scaling in those norms.
    qkv_bias: biases on the q/k/v projections.
    out_bias: bias on the output projection.
    dtype: compute dtype.
    param_dtype: storage dtype.
    lora_rank: rank of LoRA adapters on the `lora_targets` projections (0: none).
    lora_scale: the adapters' alpha / rank.
    lora_targets: of 'query', 'key', 'value', 'out'.
  """

  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_scale: float
  inv_freq: tuple[float, ...]
  softcap: float | None = None
  qk_norm: bool = False
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0
  lora_scale: float = 1.0
  lora_targets: tuple[str, ...] = ()

  def _lora(self, name: str, x: Array, in_shape, out_shape, in_axes, out_axes) -> Array | None:
    if not self.lora_rank or name not in self.lora_targets:
      return None
    return lora.delta(self, name, x, in_shape, out_shape, in_axes, out_axes, self.lora_rank,
                      self.lora_scale, self.dtype, self.param_dtype)

  def _project(self, name: str, x: Array, heads: int, axis: str) -> Array:
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    kernel = self.param(name, nn.with_logical_partitioning(init, ('embed', axis, 'kv')),
                        (self.embed_dim, heads, self.head_dim), self.param_dtype)
    # [B, T, heads, H]
    y = dense('BTD,DNH->BTNH', x, kernel.astype(self.dtype))
    adapted = self._lora(name, x, (self.embed_dim,), (heads, self.head_dim), ('embed',),
                         (axis, 'kv'))
    if adapted is not None:
      y = y + adapted
    if self.qkv_bias:
      bias = self.param(f'{name}_bias',
                        nn.with_logical_partitioning(nn.initializers.zeros, (axis, 'kv')),
                        (heads, self.head_dim), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """Attends `x` [B, T, D] to itself, or to the cache it extends.

    Args:
      x: [B, T, D] (with a cache: T new tokens per row, usually 1).
      positions: [B, T] RoPE positions; with a cache also the slot each new token is written to.
      mask: [B, T, T] without a cache; with one a `masks.CacheMask` (or a [B, T, L] mask of a
        cache whose slot s holds index s).
      cache: this layer's KV cache to extend (a decoding step), or None.

    Returns:
      ([B, T, D], {'keys', 'values'}: the extended cache, or this call's own [B, T, K, H]).
    """
    q = self._project('query', x, self.num_heads, 'heads')
    k = self._project('key', x, self.num_kv_heads, 'kv_heads')
    v = self._project('value', x, self.num_kv_heads, 'kv_heads')
    if self.qk_norm:
      norm = dict(eps=self.norm_eps, plus_one=self.norm_plus_one, axis_name='kv',
                  param_dtype=self.param_dtype)
      q = RMSNorm(name='query_norm', **norm)(q)
      k = RMSNorm(name='key_norm', **norm)(k)
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q = apply_rope(q, positions, inv_freq) * jnp.asarray(self.query_scale, self.dtype)
    k = apply_rope(k, positions, inv_freq)
    if cache is None:
      kv = {'keys': k, 'values': v}
    else:  # A ring cache (a window's) says where each index goes.
      index = mask.write_index() if isinstance(mask, masks.CacheMask) else positions
      kv = write_cache(cache, k, v, index)
    out = attend(q, kv['keys'].astype(self.dtype), kv['values'].astype(self.dtype), mask,
                 self.softcap)
    init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    kernel = self.param('out', nn.with_logical_partitioning(init, ('heads', 'kv', 'embed')),
                        (self.num_heads, self.head_dim, self.embed_dim), self.param_dtype)
    # [B, T, D]
    y = dense('BTNH,NHD->BTD', out, kernel.astype(self.dtype))
    adapted = self._lora('out', out, (self.num_heads, self.head_dim), (self.embed_dim,),
                         ('heads', 'kv'), ('embed',))
    if adapted is not None:
      y = y + adapted
    if self.out_bias:
      bias = self.param('out_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('embed',)),
                        (self.embed_dim,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y, kv
