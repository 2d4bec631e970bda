"""CALM bridges: projection of an augment layer into the anchor's width plus cross-attention.

Einsum letters: B batch, T anchor (query) length, S augment (key) length, D anchor width,
E augment width, N heads, K kv heads, H head dim.

Terms: a *bridge* is one connection (a_j, b_j): P = proj(h_A(a_j)) [B, S, D]; queries from
h_B(b_j), keys/values from P; the output `attn @ W_o` is added to the anchor's residual stream
after layer b_j (DESIGN.md). `Bridge` is one bridge, stored as `block_{j}`; `AugmentBridges`
holds the bridges of one augment; the composed model's `bridge` subtree holds every augment's.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.attention import attend
from calm_jax.configs import CalmConfig
from calm_jax.layers import RMSNorm, apply_rope, dense, rope_inverse_frequencies

Array = jax.Array


class Bridge(nn.Module):
  """One connection's projection and cross-attention.

  Attributes:
    anchor_dim: D.
    augment_dim: E.
    num_heads: N.
    num_kv_heads: K.
    head_dim: H.
    use_query_norm: RMSNorm (`query_norm`) on the anchor states before W_q.
    use_kv_norm: RMSNorm (`kv_norm`) on P.
    zero_init_out: W_o starts at zero.
    norm_eps: epsilon of the norms.
    rope_base: rotary embeddings on queries and keys with this base, or None (content only).
    dtype: compute dtype.
    param_dtype: storage dtype.
  """

  anchor_dim: int
  augment_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_query_norm: bool = True
  use_kv_norm: bool = True
  zero_init_out: bool = True
  norm_eps: float = 1e-6
  rope_base: float | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    d, e, n, k, h = (self.anchor_dim, self.augment_dim, self.num_heads, self.num_kv_heads,
                     self.head_dim)

    def kernel(name, shape, axes, in_axis=0, out_axis=-1, init=None):
      init = init or nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    self.proj = kernel('proj', (e, d), ('augment_embed', 'embed'))
    self.query = kernel('query', (d, n, h), ('embed', 'heads', 'kv'), out_axis=(1, 2))
    self.key = kernel('key', (d, k, h), ('embed', 'kv_heads', 'kv'), out_axis=(1, 2))
    self.value = kernel('value', (d, k, h), ('embed', 'kv_heads', 'kv'), out_axis=(1, 2))
    self.out = kernel('out', (n, h, d), ('heads', 'kv', 'embed'), in_axis=(0, 1), out_axis=2,
                      init=nn.initializers.zeros if self.zero_init_out else None)
    norm = dict(eps=self.norm_eps, param_dtype=self.param_dtype)
    if self.use_kv_norm:
      self.kv_norm = RMSNorm(**norm)
    if self.use_query_norm:
      self.query_norm = RMSNorm(**norm)

  def _rope(self, x: Array, positions: Array | None) -> Array:
    if self.rope_base is None:
      return x
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return apply_rope(x, positions, rope_inverse_frequencies(self.head_dim, self.rope_base))

  def keys_values(self, augment_states: Array,
                  positions: Array | None = None) -> tuple[Array, Array]:
    """Projects augment states [B, S, E] (at `positions` [B, S]) to keys, values [B, S, K, H]."""
    # [B, S, D]
    p = dense('BSE,ED->BSD', augment_states.astype(self.dtype),
                   self.proj.astype(self.dtype))
    if self.use_kv_norm:
      p = self.kv_norm(p)
    # [B, S, K, H] each
    keys = self._rope(dense('BSD,DKH->BSKH', p, self.key.astype(self.dtype)), positions)
    values = dense('BSD,DKH->BSKH', p, self.value.astype(self.dtype))
    return keys, values

  def attend(self, anchor_states: Array, keys: Array, values: Array, mask: Array,
             positions: Array | None = None) -> Array:
    """Cross-attends anchor states [B, T, D] (at `positions` [B, T]) to keys/values [B, S, K, H].

    Returns:
      [B, T, D].
    """
    x = anchor_states.astype(self.dtype)
    if self.use_query_norm:
      x = self.query_norm(x)
    # [B, T, N, H]
    q = self._rope(dense('BTD,DNH->BTNH', x, self.query.astype(self.dtype)), positions)
    q = q * jnp.asarray(self.head_dim ** -0.5, self.dtype)
    out = attend(q, keys, values, mask)
    # [B, T, D]
    y = dense('BTNH,NHD->BTD', out, self.out.astype(self.dtype))
    return y.astype(anchor_states.dtype)

  def __call__(self, anchor_states: Array, augment_states: Array, mask: Array,
               positions: Array | None = None) -> Array:
    """The bridge's contribution [B, T, D] to the anchor's residual stream (creates all params).

    Args:
      anchor_states: h_B(b_j) [B, T, D].
      augment_states: h_A(a_j) [B, S, E] (same tokens, so S = T).
      mask: [B, T, S] which augment position each anchor position may read.
      positions: [B, T] token positions (used with rope_base).
    """
    keys, values = self.keys_values(augment_states, positions)
    return self.attend(anchor_states, keys, values, mask, positions)


class AugmentBridges(nn.Module):
  """The bridges of one augment: `block_{j}` for its j-th connection (0-based).

  Attributes:
    num_bridges: number of connections.
    bridge_kwargs: the `Bridge` attributes shared by all of them.
  """

  num_bridges: int
  bridge_kwargs: dict

  def setup(self):
    self.blocks = [Bridge(**self.bridge_kwargs, name=f'block_{j}')
                   for j in range(self.num_bridges)]


def bridge_kwargs(config: CalmConfig, name: str) -> dict[str, Any]:
  """The `Bridge` attributes of augment `name`'s bridges."""
  bridge = config.bridge(name)
  num_heads, num_kv_heads, head_dim = bridge.heads(config.anchor)
  return dict(anchor_dim=config.anchor.embed_dim,
              augment_dim=dict(config.augments)[name].embed_dim, num_heads=num_heads,
              num_kv_heads=num_kv_heads, head_dim=head_dim,
              use_query_norm=bridge.use_query_norm, use_kv_norm=bridge.use_kv_norm,
              zero_init_out=bridge.zero_init_out, norm_eps=bridge.norm_eps,
              rope_base=bridge.rope_base, dtype=jnp.dtype(config.anchor.dtype),
              param_dtype=jnp.dtype(config.anchor.param_dtype))


def connected_layers(connections: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  """Sorted distinct augment layers read by `connections`."""
  return tuple(sorted({a for a, _ in connections}))
