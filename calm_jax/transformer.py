"""One decoder-only LM (Llama, Mistral, Qwen2/3, Gemma 1/2/3), exposing its residual stream.

Parameter tree (names mirror the checkpoint importers):
  embedder/{input_embedding, output_embedding?}
  layer_{i}/{pre_attention_norm, attn/{query, key, value, out, ...}, post_attention_norm?,
             pre_ffw_norm, mlp/{gating, up, down}, post_ffw_norm?}
  final_norm/scale

Einsum letters: B batch, T length, D width, V vocab.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.attention import SelfAttention
from calm_jax.configs import TransformerConfig
from calm_jax.layers import MLP, Embedder, RMSNorm, rope_inverse_frequencies

Array = jax.Array


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer, with Gemma 2/3 sandwich norms as an option.

  Attributes:
    attention: factory of the configured `SelfAttention` (a partial taking `name`).
    mlp: factory of the configured `MLP` (a partial taking `name`).
    norm_eps: RMSNorm epsilon.
    norm_plus_one: RMSNorm scales by `1 + w`.
    sandwich_norms: norm the attention and MLP outputs before each residual add.
    param_dtype: storage dtype of the norms.
  """

  attention: Callable[..., SelfAttention]
  mlp: Callable[..., MLP]
  norm_eps: float
  norm_plus_one: bool
  sandwich_norms: bool
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: dict[str, Array] | None = None,
               cache_length: int | None = None) -> tuple[Array, dict[str, Array] | None]:
    """Maps the residual stream `x` [B, T, D] through one layer (see `SelfAttention`)."""
    def norm(name):
      return RMSNorm(eps=self.norm_eps, plus_one=self.norm_plus_one,
                     param_dtype=self.param_dtype, name=name)

    h, cache = self.attention(name='attn')(norm('pre_attention_norm')(x), positions, segment_ids,
                                           cache, cache_length)
    if self.sandwich_norms:
      h = norm('post_attention_norm')(h)
    x = x + h
    h = self.mlp(name='mlp')(norm('pre_ffw_norm')(x))
    if self.sandwich_norms:
      h = norm('post_ffw_norm')(h)
    x = x + h
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), cache


class TransformerOutput(NamedTuple):
  """What `Transformer` returns.

  Attributes:
    logits: [B, T, V] float32, or None when not requested.
    hidden: residual stream after each requested layer count, {i: [B, T, D]}; i = 0 is the
      (scaled) embedding, i = n the output of `layer_{n-1}` (before the final norm).
    cache: when decoding, the KV cache {'layer_{i}': {'keys', 'values'}} of every layer run.
  """

  logits: Array | None
  hidden: dict[int, Array]
  cache: dict[str, dict[str, Array]] | None = None


REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    # Save nothing inside a layer: recompute its forward in the backward pass.
    'full': None,
    # Save the matmuls with the weights (projections, MLP), recompute attention and elementwise.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ('none',) + tuple(REMAT_POLICIES)


def check_remat(remat: str) -> str:
  """`remat` if it names a policy ('none', 'full', 'dots'), else a ValueError."""
  if remat not in REMAT_CHOICES:
    raise ValueError(f'Unknown remat {remat!r}; choose from {REMAT_CHOICES}.')
  return remat


class Transformer(nn.Module):
  """Decoder-only language model.

  Attributes:
    config: the architecture.
    remat: rematerialisation of layers in training ('none', 'full' or 'dots', `REMAT_POLICIES`):
      their activations are recomputed in the backward pass instead of kept. Parameters and
      results do not change; decoding never remats.
    remat_from: only layers i >= remat_from are rematerialised (a composition sets its first
      bridge: nothing below it is differentiated).
  """

  config: TransformerConfig
  remat: str = 'none'
  remat_from: int = 0

  def _layer(self, i: int, remat: bool = False) -> DecoderLayer:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    local = cfg.attention_type(i) == 'local'
    base = cfg.local_rope_base if local and cfg.local_rope_base is not None else cfg.rope_base
    inv_freq = rope_inverse_frequencies(cfg.head_dim, base, None if local else cfg.rope_scaling)
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    attention = functools.partial(
        SelfAttention,
        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, query_scale=float(scalar) ** -0.5,
        inv_freq=tuple(float(f) for f in inv_freq),
        window=cfg.sliding_window if local else None, softcap=cfg.attn_logit_softcap,
        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, norm_plus_one=cfg.norm_plus_one,
        qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, dtype=dtype, param_dtype=param_dtype)
    mlp = functools.partial(MLP, embed_dim=cfg.embed_dim, mlp_dim=cfg.mlp_dim,
                            activation=cfg.activation, gated=cfg.gated_mlp, dtype=dtype,
                            param_dtype=param_dtype)
    layer_class = DecoderLayer
    if remat:
      layer_class = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat])  # Checked.
    return layer_class(attention=attention, mlp=mlp, norm_eps=cfg.norm_eps,
                       norm_plus_one=cfg.norm_plus_one, sandwich_norms=cfg.sandwich_norms,
                       param_dtype=param_dtype, name=f'layer_{i}')

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, *, return_hidden: Sequence[int] = (),
               compute_logits: bool = True,
               after_layer: Callable[[int, Array], Array] | None = None,
               cache: dict[str, dict[str, Array]] | None = None,
               cache_length: int | None = None,
               logits_index: Array | None = None) -> TransformerOutput:
    """Runs the LM.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] RoPE positions; default 0..T-1 in every row.
      segment_ids: [B, T] segment of each token, 0 for padding (T5X's decoder_segment_ids);
        default all ones. Tokens attend causally within their own segment only.
      return_hidden: layer counts i in [0, num_layers] whose residual stream to return.
      compute_logits: if False, stop after the deepest requested layer and return no logits.
      after_layer: `f(i, x) -> x` applied to the residual stream after i layers (i = 0 is the
        embedding), before the next layer reads it; where the composition adds its bridges.
      cache: a decoding step (T = 1): the KV cache of the previous call; `positions` [B, 1] is
        each row's sequence index (and cache slot) of the new token.
      cache_length: a prefill: also return a KV cache with this many slots (prompt + decode).
      logits_index: [B] one position per row whose logits to compute (a prefill needs only
        each row's last prompt token); logits are then [B, 1, V].

    Returns:
      A `TransformerOutput`.
    """
    cfg = self.config
    bad = [i for i in return_hidden if not 0 <= i <= cfg.num_layers]
    if bad:
      raise ValueError(f'return_hidden {bad} outside [0, {cfg.num_layers}].')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    embedder = Embedder(vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                        tie=cfg.tie_embeddings, scale=cfg.scale_embeddings,
                        init_scale=cfg.embedding_init_scale,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                        name='embedder')
    wanted = set(return_hidden)
    last = cfg.num_layers if compute_logits else max(wanted, default=0)
    x = nn.with_logical_constraint(embedder.encode(tokens), ('batch', 'length', 'embed'))
    if after_layer is not None:
      x = after_layer(0, x)
    hidden = {0: x} if 0 in wanted else {}
    decoding = cache is not None or cache_length is not None
    new_cache = {} if decoding else None
    check_remat(self.remat)
    for i in range(last):
      name = f'layer_{i}'
      if not decoding and self.remat != 'none' and i >= self.remat_from:
        x, layer_cache = self._layer(i, remat=True)(x, positions, segment_ids)
      else:
        x, layer_cache = self._layer(i)(x, positions, segment_ids,
                                        None if cache is None else cache[name], cache_length)
      if decoding:
        new_cache[name] = layer_cache
      if after_layer is not None:
        x = after_layer(i + 1, x)
      if i + 1 in wanted:
        hidden[i + 1] = x
    if not compute_logits:
      return TransformerOutput(None, hidden, new_cache)
    if logits_index is not None:
      x = x[jnp.arange(x.shape[0]), logits_index][:, None]
    x = RMSNorm(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                param_dtype=jnp.dtype(cfg.param_dtype), name='final_norm')(x)
    logits = embedder.decode(x)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if cfg.final_logit_softcap is not None:
      logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return TransformerOutput(logits, hidden, new_cache)


def abstract_params(config: TransformerConfig):
  """Shapes/dtypes of the parameter tree (boxed with logical axes), without allocating."""
  model = Transformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)['params']


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of `config`'s model, computed from shapes only."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(config)))
  return sum(int(x.size) for x in leaves)
