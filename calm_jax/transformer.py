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
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import masks
from calm_jax.attention import SelfAttention, pad_cache, ring_cache
from calm_jax.configs import TransformerConfig
from calm_jax.layers import MLP, Embedder, RMSNorm, rope_inverse_frequencies
from calm_jax.lora import LoRAConfig

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
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """Maps the residual stream `x` [B, T, D] through one layer.

    Returns:
      (the new residual stream [B, T, D], the attention's keys and values or extended cache;
      see `SelfAttention`).
    """
    def norm(name):
      return RMSNorm(eps=self.norm_eps, plus_one=self.norm_plus_one,
                     param_dtype=self.param_dtype, name=name)

    h, kv = self.attention(name='attn')(norm('pre_attention_norm')(x), positions, mask, cache)
    if self.sandwich_norms:
      h = norm('post_attention_norm')(h)
    x = x + h
    h = self.mlp(name='mlp')(norm('pre_ffw_norm')(x))
    if self.sandwich_norms:
      h = norm('post_ffw_norm')(h)
    x = x + h
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), kv


class TransformerOutput(NamedTuple):
  """What `Transformer` returns.

  Attributes:
    logits: [B, T, V] float32, or None when not requested.
    hidden: residual stream after each requested layer count, {i: [B, T, D]}; i = 0 is the
      (scaled) embedding, i = n the output of `layer_{n-1}` (before the final norm).
    cache: from `prefill` and `extend`, the KV cache {'layer_{i}': {'keys', 'values'}} of
      every layer run; None from `__call__`.
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

# Slots per block of a decoding step's cache attention (`Transformer.decode_block_size`).
DECODE_BLOCK_SIZE = 256


def check_remat(remat: str) -> str:
  """`remat` if it names a policy ('none', 'full', 'dots'), else a ValueError."""
  if remat not in REMAT_CHOICES:
    raise ValueError(f'Unknown remat {remat!r}; choose from {REMAT_CHOICES}.')
  return remat


class Transformer(nn.Module):
  """Decoder-only language model.

  `__call__` is the full forward pass; `prefill` and `extend` are the cached decoding entry
  points (the same signature as `Calm`'s, so `calm_jax.decoding` serves both). The embedder,
  the layers and the head (`embed`, `layers`, `logits`) are also what a composition drives
  layer by layer.

  Attributes:
    config: the architecture.
    remat: rematerialisation of layers in training ('none', 'full' or 'dots', `REMAT_POLICIES`):
      their activations are recomputed in the backward pass instead of kept. Parameters and
      results do not change, and nothing changes without a backward pass (decoding).
    remat_from: only layers i >= remat_from are rematerialised (a composition sets its first
      bridge: nothing below it is differentiated).
    lora: LoRA adapters on every layer's projections (`calm_jax.lora`), or None.
    attention_block_size: full forward passes and prefills attend in blocks of this many keys
      (`calm_jax.blocked_attention`: the same result, activation memory linear in length),
      or None: over a materialised [B, T, T] mask. Decoding steps are unchanged.
    decode_block_size: decoding steps attend their caches in blocks of this many slots, only
      as far as the slots written so far (`blocked_attention.cached_attention`: a step costs
      the current length, not the cache's; a cache of one block or less is read whole), or
      None: every slot through a materialised mask.
  """

  config: TransformerConfig
  remat: str = 'none'
  remat_from: int = 0
  lora: LoRAConfig | None = None
  attention_block_size: int | None = None
  decode_block_size: int | None = DECODE_BLOCK_SIZE

  def setup(self):
    cfg = self.config
    check_remat(self.remat)
    self.embedder = Embedder(vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                             tie=cfg.tie_embeddings, scale=cfg.scale_embeddings,
                             init_scale=cfg.embedding_init_scale, dtype=jnp.dtype(cfg.dtype),
                             param_dtype=jnp.dtype(cfg.param_dtype))
    self.layers = [self._make_layer(i) for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                              param_dtype=jnp.dtype(cfg.param_dtype))

  def _make_layer(self, i: int) -> DecoderLayer:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    local = cfg.attention_type(i) == 'local'
    base = cfg.local_rope_base if local and cfg.local_rope_base is not None else cfg.rope_base
    inv_freq = rope_inverse_frequencies(cfg.head_dim, base, None if local else cfg.rope_scaling)
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    adapters = {}
    if self.lora is not None:
      adapters = dict(lora_rank=self.lora.rank, lora_scale=self.lora.scale,
                      lora_targets=self.lora.targets)
    attention = functools.partial(
        SelfAttention, **adapters,
        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, query_scale=float(scalar) ** -0.5,
        inv_freq=tuple(float(f) for f in inv_freq), softcap=cfg.attn_logit_softcap,
        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, norm_plus_one=cfg.norm_plus_one,
        qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, dtype=dtype, param_dtype=param_dtype)
    mlp = functools.partial(MLP, **adapters, embed_dim=cfg.embed_dim, mlp_dim=cfg.mlp_dim,
                            activation=cfg.activation, gated=cfg.gated_mlp, dtype=dtype,
                            param_dtype=param_dtype)
    layer_class = DecoderLayer
    if self.remat != 'none' and i >= self.remat_from:
      layer_class = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat])
    return layer_class(attention=attention, mlp=mlp, norm_eps=cfg.norm_eps,
                       norm_plus_one=cfg.norm_plus_one, sandwich_norms=cfg.sandwich_norms,
                       param_dtype=param_dtype, name=f'layer_{i}')

  def embed(self, tokens: Array) -> Array:
    """The residual stream before the first layer: embeddings [B, T, D] of `tokens` [B, T]."""
    return nn.with_logical_constraint(self.embedder.encode(tokens), ('batch', 'length', 'embed'))

  def logits(self, x: Array, index: Array | None = None) -> Array:
    """Final norm, output projection and soft-cap of the residual stream: [B, T, V] float32.

    With `index` [B], only one position per row: [B, 1, V] (a prefill needs each row's last
    prompt token only).
    """
    if index is not None:
      x = x[jnp.arange(x.shape[0]), index][:, None]
    logits = self.embedder.decode(self.final_norm(x))
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return logits

  def sequence_masks(self, segment_ids: Array) -> dict[int | None, Any]:
    """{window: [B, T, T] mask (a `masks.KeyedMask` with `attention_block_size`)} of a full
    forward pass, one per distinct layer window."""
    return {w: masks.sequence_mask(segment_ids, w, self.attention_block_size)
            for w in self.config.layer_windows()}

  def cache_masks(self, positions: Array, cache: Mapping[str, Mapping[str, Array]]
                  ) -> dict[int | None, masks.CacheMask]:
    """{window: `masks.CacheMask`} of a decoding step at `positions` [B, K] over `cache`
    (each window's slots are those of its layers' caches)."""
    cfg = self.config
    # An augment runs (and caches) only up to its deepest connected layer.
    slots = {cfg.layer_window(i): cache[f'layer_{i}']['keys'].shape[1]
             for i in range(cfg.num_layers) if f'layer_{i}' in cache}
    return {w: masks.cache_mask(positions, n, w, self.decode_block_size)
            for w, n in slots.items()}

  def decoding_cache(self, kv: Mapping[str, Mapping[str, Array]], prompt_mask: Array,
                     cache_length: int, window_caches: bool = True) -> dict[str, Any]:
    """The cache of a prefill's keys and values {layer: {'keys', 'values'} [B, P, K, H]}:
    `cache_length` slots per global layer; with `window_caches`, a sliding-window layer's
    cache is a ring of its window's slots when that is fewer (`attention.ring_cache`; its
    steps then take one token each)."""
    cfg = self.config
    last = last_prompt_index(prompt_mask)
    cache = {}
    for name, layer in kv.items():
      window = cfg.layer_window(int(name.split('_')[1]))
      if window_caches and window is not None and window < cache_length:
        cache[name] = ring_cache(layer['keys'], layer['values'], last, window)
      else:
        cache[name] = pad_cache(layer['keys'], layer['values'], cache_length)
    return cache

  def _run(self, tokens: Array, positions: Array, layer_masks: dict[int | None, Array],
           cache: dict[str, dict[str, Array]] | None, return_hidden: Sequence[int],
           compute_logits: bool, logits_index: Array | None = None) -> TransformerOutput:
    """The layer loop shared by the three entry points; `cache` is extended when given."""
    cfg = self.config
    check_return_hidden(cfg, return_hidden)
    wanted = set(return_hidden)
    depth = cfg.num_layers if compute_logits else max(wanted, default=0)
    x = self.embed(tokens)
    hidden = {0: x} if 0 in wanted else {}
    kv = {}
    for i in range(depth):
      name = f'layer_{i}'
      x, kv[name] = self.layers[i](x, positions, layer_masks[cfg.layer_window(i)],
                                   None if cache is None else cache[name])
      if i + 1 in wanted:
        hidden[i + 1] = x
    logits = self.logits(x, logits_index) if compute_logits else None
    return TransformerOutput(logits, hidden, kv)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, *, return_hidden: Sequence[int] = (),
               compute_logits: bool = True) -> TransformerOutput:
    """The full forward pass.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] RoPE positions; default 0..T-1 in every row.
      segment_ids: [B, T] segment of each token, 0 for padding (T5X's decoder_segment_ids);
        default all ones. Tokens attend causally within their own segment only.
      return_hidden: layer counts i in [0, num_layers] whose residual stream to return.
      compute_logits: if False, stop after the deepest requested layer and return no logits.

    Returns:
      A `TransformerOutput` without cache.
    """
    positions, segment_ids = default_positions_and_segments(tokens, positions, segment_ids)
    out = self._run(tokens, positions, self.sequence_masks(segment_ids), None, return_hidden,
                    compute_logits)
    return out._replace(cache=None)

  def prefill(self, tokens: Array, prompt_mask: Array, *, cache_length: int,
              return_hidden: Sequence[int] = (), compute_logits: bool = True,
              window_caches: bool = True) -> TransformerOutput:
    """Runs the prompts and returns their KV cache: the first call of cached decoding.

    Args:
      tokens: [B, P] decoder input tokens; each row's prompt is the prefix marked by
        `prompt_mask`, what follows it is never read by the prompt's positions.
      prompt_mask: [B, P] 1 on each row's prompt (a non-empty prefix).
      cache_length: L >= P slots of the returned cache (prompt + tokens to decode).
      return_hidden, compute_logits: as in `__call__`.
      window_caches: sliding-window layers keep ring caches of their window
        (`decoding_cache`); False: L slots everywhere, for decoders that feed several tokens
        per step or roll back.

    Returns:
      A `TransformerOutput`: logits [B, 1, V] at each row's last prompt token, the cache
      {'layer_{i}': {'keys', 'values'} [B, L or window, K, H]}.
    """
    positions, segment_ids = default_positions_and_segments(tokens)
    out = self._run(tokens, positions, self.sequence_masks(segment_ids), None, return_hidden,
                    compute_logits, logits_index=last_prompt_index(prompt_mask))
    return out._replace(cache=self.decoding_cache(out.cache, prompt_mask, cache_length,
                                                  window_caches))

  def extend(self, tokens: Array, positions: Array, cache: dict[str, dict[str, Array]], *,
             return_hidden: Sequence[int] = (),
             compute_logits: bool = True) -> TransformerOutput:
    """One decoding step: feeds the new tokens of each row and extends the cache.

    Args:
      tokens: [B, K] the new tokens (usually K = 1; more re-run a changed tail, which needs a
        cache without window rings: `prefill(..., window_caches=False)`).
      positions: [B, K] each row's sequence index of its new tokens (RoPE position and cache
        slot; each reads the slots at or before it).
      cache: the cache of the previous `prefill` or `extend`.
      return_hidden, compute_logits: as in `__call__`.

    Returns:
      A `TransformerOutput`: logits [B, K, V] and the extended cache.
    """
    return self._run(tokens, positions, self.cache_masks(positions, cache), cache,
                     return_hidden, compute_logits)


def check_return_hidden(config: TransformerConfig, return_hidden: Sequence[int]) -> None:
  """Raises a ValueError for a requested layer count outside [0, num_layers]."""
  bad = [i for i in return_hidden if not 0 <= i <= config.num_layers]
  if bad:
    raise ValueError(f'return_hidden {bad} outside [0, {config.num_layers}].')


def default_positions_and_segments(tokens: Array, positions: Array | None = None,
                                   segment_ids: Array | None = None) -> tuple[Array, Array]:
  """`positions` (default 0..T-1) and `segment_ids` (default all ones) of tokens [B, T]."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  return positions, segment_ids


def last_prompt_index(prompt_mask: Array) -> Array:
  """[B] index of each row's last prompt token (0 for a row without prompt)."""
  return jnp.maximum(jnp.sum(prompt_mask, axis=1).astype(jnp.int32) - 1, 0)


def abstract_params(config: TransformerConfig, lora: LoRAConfig | None = None):
  """Shapes/dtypes of the parameter tree (boxed with logical axes), without allocating; with
  `lora`, the adapters too."""
  model = Transformer(config, lora=lora)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)['params']
