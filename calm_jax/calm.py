"""The composed model: augments run forward, the anchor runs with bridges added to its stream.

Parameter tree (DESIGN.md):
  anchor/...                      the anchor LM (frozen)
  augments/{name}/...             each augmenting LM (frozen)
  bridge/{name}/block_{j}/...     the trained bridges: proj, query, key, value, out, norms

Einsum letters: B batch, T length, L cache length.

Decoding cache (paper, section 3.1: every new token is fed to both models, so the augments'
states are refreshed at each step):
  anchor/layer_{i}/{keys, values}            the anchor's KV cache
  augments/{name}/layer_{i}/{keys, values}   each augment's KV cache (up to its deepest connection)
  bridge/{name}/block_{j}/{keys, values}     each bridge's projected keys/values [B, L, K, H]
  prompt_length                              [B] prompt tokens per row
With `augment_as_encoder` the augments and bridge caches stop at the prompt: a decoding step runs
the anchor only and its bridges read the prompt's keys/values.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.attention import attention_mask, pad_cache, write_cache
from calm_jax.bridge import Bridge, BridgeBlock, connected_layers
from calm_jax.configs import CalmConfig, TransformerConfig
from calm_jax.transformer import Transformer, TransformerOutput

Array = jax.Array


class Augments(nn.Module):
  """The augmenting LMs, each a child named after its augment.

  Attributes:
    configs: (name, TransformerConfig) per augment.
  """

  configs: tuple[tuple[str, TransformerConfig], ...]

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
               layers: dict[str, tuple[int, ...]], cache: dict[str, Any] | None = None,
               cache_length: int | None = None
               ) -> tuple[dict[str, dict[int, Array]], dict[str, Any] | None]:
    """Residual streams {name: {layer: [B, T, E]}} after the requested layers (no logits).

    With `cache` (a decoding step) or `cache_length` (a prefill) also returns each augment's KV
    cache {name: ...}, else None.
    """
    hidden, caches = {}, {}
    for name, config in self.configs:
      out = Transformer(config, name=name)(
          tokens, positions, segment_ids, return_hidden=layers[name], compute_logits=False,
          cache=None if cache is None else cache[name], cache_length=cache_length)
      hidden[name], caches[name] = out.hidden, out.cache
    decoding = cache is not None or cache_length is not None
    return hidden, caches if decoding else None


class Bridges(nn.Module):
  """The bridges of every augment: child `{name}` holds `block_{j}`.

  Attributes:
    specs: (augment name, number of blocks, BridgeBlock attributes) per augment.
  """

  specs: tuple[tuple[str, int, Any], ...]

  def setup(self):
    for name, num_blocks, kwargs in self.specs:
      setattr(self, name, Bridge(num_blocks=num_blocks, block_kwargs=kwargs))

  def block(self, name: str, j: int) -> BridgeBlock:
    """Block j of augment `name`."""
    return getattr(self, name).block(j)

  def __call__(self, name: str, j: int, anchor_states: Array, augment_states: Array,
               mask: Array, positions: Array | None = None) -> Array:
    """Block j of augment `name` (see `BridgeBlock.__call__`)."""
    return getattr(self, name)(j, anchor_states, augment_states, mask, positions)


def bridge_block_kwargs(config: CalmConfig, name: str) -> dict[str, Any]:
  """The BridgeBlock attributes of augment `name`'s bridges."""
  bridge = config.bridge(name)
  num_heads, num_kv_heads, head_dim = bridge.heads(config.anchor)
  return dict(anchor_dim=config.anchor.embed_dim,
              augment_dim=dict(config.augments)[name].embed_dim, num_heads=num_heads,
              num_kv_heads=num_kv_heads, head_dim=head_dim, use_query_norm=bridge.query_norm,
              use_kv_norm=bridge.kv_norm, zero_init_out=bridge.zero_init_out,
              norm_eps=bridge.norm_eps, rope_base=bridge.rope_base,
              dtype=jnp.dtype(config.anchor.dtype),
              param_dtype=jnp.dtype(config.anchor.param_dtype))


def attachments(config: CalmConfig) -> dict[int, list[tuple[str, int, int]]]:
  """{anchor_layer: [(augment name, block j, augment_layer), ...]} in application order."""
  attached: dict[int, list[tuple[str, int, int]]] = {}
  for name, _ in config.augments:
    for j, (a, b) in enumerate(config.connections(name)):
      attached.setdefault(b, []).append((name, j, a))
  return attached


class Calm(nn.Module):
  """Anchor + augments + bridges; outputs are the anchor's.

  Attributes:
    config: the composition.
    remat: rematerialisation of the anchor layers above the first bridge in training ('none',
      'full', 'dots'; see `Transformer`). The layers below it and the augments run forward
      only, so there is nothing of theirs to recompute.
  """

  config: CalmConfig
  remat: str = 'none'

  def setup(self):
    cfg = self.config
    first_bridge = min((b for name, _ in cfg.augments for _, b in cfg.connections(name)),
                       default=0)
    self.anchor = Transformer(cfg.anchor, remat=self.remat, remat_from=first_bridge)
    self.augments = Augments(cfg.augments)
    self.bridge = Bridges(tuple(
        (name, len(cfg.connections(name)), bridge_block_kwargs(cfg, name))
        for name, _ in cfg.augments))

  def cross_mask(self, segment_ids: Array, prompt_mask: Array | None) -> Array:
    """[B, T, S] mask of the bridges: causal, same segment, real tokens (+ prompt only)."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    mask = attention_mask(index, index, segment_ids, segment_ids)
    if self.config.augment_as_encoder:
      if prompt_mask is None:
        raise ValueError('augment_as_encoder needs a prompt_mask ([B, T], 1 on the prompt).')
      mask &= prompt_mask[:, None, :].astype(bool)
    return mask

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, prompt_mask: Array | None = None, *,
               return_hidden: tuple[int, ...] = (), cache: dict[str, Any] | None = None,
               cache_length: int | None = None,
               logits_index: Array | None = None) -> TransformerOutput:
    """Runs the composition (a full forward pass, a prefill or one decoding step).

    Args:
      tokens: [B, T] token ids, read by every model (shared vocabulary).
      positions: [B, T]; default 0..T-1. In a decoding step, [B, 1] each row's sequence index
        (and cache slot) of the new token.
      segment_ids: [B, T], 0 for padding; default all ones.
      prompt_mask: [B, T], 1 on prompt tokens; required by `augment_as_encoder` (full forward
        and prefill).
      return_hidden: anchor layers whose (bridged) residual stream to return.
      cache: a decoding step (T = 1): the composed cache of the previous call.
      cache_length: a prefill: also return the composed cache with this many slots.
      logits_index: [B] the one position per row whose logits to compute ([B, 1, V]).

    Returns:
      The anchor's `TransformerOutput` (logits [B, T, V] float32); when decoding, its `cache` is
      the composed cache (module docstring).
    """
    cfg = self.config
    if positions is None:
      if cache is not None:
        raise ValueError('a decoding step needs the positions of its tokens.')
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    layers = {name: connected_layers(cfg.connections(name)) for name, _ in cfg.augments}
    step = cache is not None
    encoder_step = step and cfg.augment_as_encoder
    augment_states, augment_cache = {}, None
    if not encoder_step:
      augment_states, augment_cache = self.augments(
          tokens, positions, segment_ids, layers,
          cache=cache['augments'] if step else None, cache_length=cache_length)
    else:
      augment_cache = cache['augments']
    if step:
      prompt_length = cache['prompt_length']
      slots = jnp.arange(cache['anchor']['layer_0']['keys'].shape[1])[None, None, :]
      # [B, 1, L]: causal over the cache, or the prompt only for the encoder ablation.
      mask = (slots < prompt_length[:, None, None] if cfg.augment_as_encoder
              else slots <= positions[:, :, None])
    else:
      mask = self.cross_mask(segment_ids, prompt_mask)
      prompt_length = jnp.sum((segment_ids != 0) if prompt_mask is None
                              else prompt_mask.astype(bool), axis=1).astype(jnp.int32)
    attached = attachments(cfg)
    bridge_cache: dict[str, dict[str, Any]] = {name: {} for name, _ in cfg.augments}

    def add_bridges(layer: int, x: Array) -> Array:
      for name, j, a in attached.get(layer, ()):
        block = self.bridge.block(name, j)
        if step:
          kv = cache['bridge'][name][f'block_{j}']
          if not cfg.augment_as_encoder:
            kv = write_cache(kv, *block.keys_values(augment_states[name][a], positions),
                             positions[:, 0])
          bridge_cache[name][f'block_{j}'] = kv
          keys, values = kv['keys'].astype(x.dtype), kv['values'].astype(x.dtype)
        else:
          keys, values = block.keys_values(augment_states[name][a], positions)
          if cache_length is not None:
            bridge_cache[name][f'block_{j}'] = pad_cache(keys, values, cache_length)
        x = x + block.attend(x, keys, values, mask, positions)
      return x

    out = self.anchor(tokens, positions, segment_ids, return_hidden=return_hidden,
                      after_layer=add_bridges, cache=cache['anchor'] if step else None,
                      cache_length=cache_length, logits_index=logits_index)
    if not step and cache_length is None:
      return out
    return out._replace(cache={'anchor': out.cache, 'augments': augment_cache,
                               'bridge': bridge_cache, 'prompt_length': prompt_length})


def abstract_params(config: CalmConfig) -> Any:
  """Shapes of the whole composed tree (boxed with logical axes), without allocating."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: Calm(config).init(jax.random.key(0), t, prompt_mask=t),
                        tokens)['params']


def init_bridge_params(config: CalmConfig, rng: Array) -> dict[str, Any]:
  """Initial trained tree {'bridge': {name: {'block_j': ...}}}, touching no frozen model.

  Each augment's blocks share one compiled init (same shapes); block j of augment i uses the
  key `fold_in(fold_in(rng, i), j)`.
  """
  bridges = {}
  for i, (name, augment) in enumerate(config.augments):
    block = BridgeBlock(**bridge_block_kwargs(config, name))
    init = jax.jit(block.init)
    dtype = jnp.dtype(config.anchor.dtype)
    x = jnp.zeros((1, 1, config.anchor.embed_dim), dtype)
    h = jnp.zeros((1, 1, augment.embed_dim), jnp.dtype(augment.dtype))
    mask = jnp.ones((1, 1, 1), bool)
    key = jax.random.fold_in(rng, i)
    bridges[name] = {
        f'block_{j}': nn.unbox(init(jax.random.fold_in(key, j), x, h, mask)['params'])
        for j in range(len(config.connections(name)))}
  return {'bridge': bridges}
