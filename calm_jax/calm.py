"""The composed model: augments run forward, the anchor runs with bridges added to its stream.

Parameter tree (DESIGN.md):
  anchor/...                      the anchor LM (frozen)
  augments/{name}/...             each augmenting LM (frozen)
  bridge/{name}/block_{j}/...     the trained bridges: proj, query, key, value, out, norms

One forward pass, in the order `Calm` runs it:
  1. each augment's residual streams after its connected layers (`Transformer`, no logits);
  2. each bridge's keys and values from its augment layer (`Bridge.keys_values`);
  3. the anchor: embedding, then for each depth i = 0..n the bridges attached after layer i
     (`Bridge.attend`, added to the stream) followed by anchor layer i; final norm and logits.
Masks are built once (`calm_jax.masks`) and passed down.

An augment in `config.own_tokenizer` reads the text in its own tokenization (`AugmentStream`:
its tokens, positions, segments and the read keys of `calm_jax.alignment`); its cross mask is
`masks.attention_mask` over the two streams' read keys instead of their indices, which is
today's mask exactly when both tokenizations are the same.

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

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import masks
from calm_jax.attention import pad_cache, write_cache
from calm_jax.bridge import AugmentBridges, Bridge, bridge_kwargs, connected_layers
from calm_jax.configs import CalmConfig, TransformerConfig
from calm_jax.transformer import (DECODE_BLOCK_SIZE, Transformer, TransformerOutput,
                                  check_return_hidden, default_positions_and_segments,
                                  last_prompt_index)

Array = jax.Array
# The read key of an empty slot of an own-tokenizer augment's cache: no query reads it.
KEY_EMPTY = np.iinfo(np.int32).max
# {augment name: {block j: (keys, values) [B, S, K, H]}}
BridgeKV = dict[str, dict[int, tuple[Array, Array]]]


class AugmentStream(NamedTuple):
  """What an augment with its own tokenizer reads in a full forward pass (`Calm.__call__`).

  Attributes:
    tokens: [B, S] its decoder input tokens (its vocabulary; the same text as the anchor's).
    read_keys: [B, S] each input's read key (`alignment.decoder_read_keys`).
    anchor_read_keys: [B, T] the anchor's inputs' read keys over the same text.
    positions: [B, S]; default 0..S-1.
    segment_ids: [B, S], 0 for padding; default all ones.
    prompt_mask: [B, S] 1 on its prompt tokens (for `augment_as_encoder`).
  """

  tokens: Array
  read_keys: Array
  anchor_read_keys: Array
  positions: Array | None = None
  segment_ids: Array | None = None
  prompt_mask: Array | None = None


class Augments(nn.Module):
  """The augmenting LMs: child `{name}` (a `Transformer`) per augment.

  Attributes:
    configs: (name, TransformerConfig) per augment.
    attention_block_size, decode_block_size: of every augment (`Transformer`).
  """

  configs: tuple[tuple[str, TransformerConfig], ...]
  attention_block_size: int | None = None
  decode_block_size: int | None = DECODE_BLOCK_SIZE

  def setup(self):
    self.lms = {name: Transformer(config, attention_block_size=self.attention_block_size,
                                  decode_block_size=self.decode_block_size, name=name)
                for name, config in self.configs}


class Bridges(nn.Module):
  """Every augment's bridges: child `{name}` (an `AugmentBridges`) per augment.

  Attributes:
    specs: (augment name, number of bridges, `Bridge` attributes) per augment.
  """

  specs: tuple[tuple[str, int, Any], ...]

  def setup(self):
    self.augments = {name: AugmentBridges(num_bridges=n, bridge_kwargs=kwargs, name=name)
                     for name, n, kwargs in self.specs}

  def get(self, name: str, j: int) -> Bridge:
    """Bridge j of augment `name`."""
    return self.augments[name].blocks[j]


def attachments(config: CalmConfig) -> dict[int, list[tuple[str, int, int]]]:
  """{anchor_layer: [(augment name, bridge j, augment_layer), ...]} in application order."""
  attached: dict[int, list[tuple[str, int, int]]] = {}
  for name, _ in config.augments:
    for j, (a, b) in enumerate(config.connections(name)):
      attached.setdefault(b, []).append((name, j, a))
  return attached


class Calm(nn.Module):
  """Anchor + augments + bridges; outputs are the anchor's.

  `__call__` is the full forward pass; `prefill` and `extend` are the cached decoding entry
  points, with the signature of `Transformer`'s.

  Attributes:
    config: the composition.
    remat: rematerialisation of the anchor layers above the first bridge in training ('none',
      'full', 'dots'; see `Transformer`). The layers below it and the augments run forward
      only, so there is nothing of theirs to recompute.
    attention_block_size: the anchor, the augments and the bridges attend in blocks of this
      many keys in full forward passes and prefills (see `Transformer`), or None.
    decode_block_size: decoding steps attend the caches of the anchor, the augments and the
      bridges in blocks of this many slots, as far as the slots written so far (see
      `Transformer`), or None: every slot.
  """

  config: CalmConfig
  remat: str = 'none'
  attention_block_size: int | None = None
  decode_block_size: int | None = DECODE_BLOCK_SIZE

  def setup(self):
    cfg = self.config
    self.anchor = Transformer(cfg.anchor, remat=self.remat,
                              remat_from=cfg.first_bridged_layer(),
                              attention_block_size=self.attention_block_size,
                              decode_block_size=self.decode_block_size)
    self.augments = Augments(cfg.augments, attention_block_size=self.attention_block_size,
                             decode_block_size=self.decode_block_size)
    self.bridge = Bridges(tuple((name, len(cfg.connections(name)), bridge_kwargs(cfg, name))
                                for name, _ in cfg.augments))

  def _check_streams(self, streams: Mapping[str, AugmentStream] | None
                     ) -> dict[str, AugmentStream]:
    streams = dict(streams or {})
    if set(streams) != set(self.config.own_tokenizer):
      raise ValueError(f'Calm: streams for {sorted(streams)}, but the augments with their own '
                       f'tokenizer are {list(self.config.own_tokenizer)}.')
    return streams

  def _augment_layers(self) -> dict[str, tuple[int, ...]]:
    return {name: connected_layers(self.config.connections(name))
            for name, _ in self.config.augments}

  def _run_augments(self, run: Callable[[Transformer, tuple[int, ...]], TransformerOutput]
                    ) -> dict[str, TransformerOutput]:
    """{name: run(augment LM, the layers its bridges read)} for every augment."""
    return {name: run(self.augments.lms[name], layers)
            for name, layers in self._augment_layers().items()}

  def _keys_values(self, augments: dict[str, TransformerOutput], positions: Array) -> BridgeKV:
    """Each bridge's keys and values from its augment layer's states [B, S, E]."""
    return {name: {j: self.bridge.get(name, j).keys_values(augments[name].hidden[a], positions)
                   for j, (a, _) in enumerate(self.config.connections(name))}
            for name, _ in self.config.augments}

  def _anchor(self, tokens: Array, positions: Array, layer_masks: dict[int | None, Array],
              cache: dict[str, Any] | None, keys_values: BridgeKV,
              cross_mask: Array | Mapping[str, Array], return_hidden: Sequence[int],
              logits_index: Array | None = None,
              compute_logits: bool = True) -> TransformerOutput:
    """The anchor's pass: embedding, then at each depth its bridges and its next layer
    (`cross_mask`: one for every augment, or {name: mask})."""
    anchor = self.config.anchor
    check_return_hidden(anchor, return_hidden)
    attached = attachments(self.config)
    x = self.anchor.embed(tokens)
    hidden, kv = {}, {}
    for i in range(anchor.num_layers + 1):
      for name, j, _ in attached.get(i, ()):
        keys, values = keys_values[name][j]
        mask = cross_mask[name] if isinstance(cross_mask, Mapping) else cross_mask
        x = x + self.bridge.get(name, j).attend(x, keys.astype(x.dtype), values.astype(x.dtype),
                                                mask, positions)
      if i in return_hidden:
        hidden[i] = x
      if i == anchor.num_layers:
        break
      layer = f'layer_{i}'
      x, kv[layer] = self.anchor.layers[i](x, positions, layer_masks[anchor.layer_window(i)],
                                           None if cache is None else cache[layer])
    logits = self.anchor.logits(x, logits_index) if compute_logits else None
    return TransformerOutput(logits, hidden, kv)

  def head_logits(self, x: Array) -> Array:
    """The anchor's head (final norm, projection, soft-cap) of a residual stream [B, T, D]:
    [B, T, V] float32 logits."""
    return self.anchor.logits(x)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, prompt_mask: Array | None = None, *,
               streams: Mapping[str, AugmentStream] | None = None,
               return_hidden: Sequence[int] = (),
               compute_logits: bool = True) -> TransformerOutput:
    """The full forward pass of the composition.

    Args:
      tokens: [B, T] token ids the anchor reads, and every augment that shares its vocabulary.
      positions: [B, T]; default 0..T-1.
      segment_ids: [B, T], 0 for padding; default all ones.
      prompt_mask: [B, T], 1 on prompt tokens; required by `augment_as_encoder`.
      streams: {name: AugmentStream} for each augment of `config.own_tokenizer`.
      return_hidden: anchor layers whose (bridged) residual stream to return.
      compute_logits: if False, no head: the output's logits are None (a chunked loss
        applies the head itself, `head_logits`).

    Returns:
      The anchor's `TransformerOutput` (logits [B, T, V] float32, no cache).

    Raises:
      ValueError: a missing prompt mask, or streams that do not match `own_tokenizer`.
    """
    positions, segment_ids = default_positions_and_segments(tokens, positions, segment_ids)
    encoder = self.config.augment_as_encoder
    if encoder and prompt_mask is None:
      raise ValueError('augment_as_encoder needs a prompt_mask ([B, T], 1 on the prompt).')
    streams = self._check_streams(streams)
    block = self.attention_block_size
    shared = masks.cross_mask(segment_ids, prompt_mask if encoder else None, block)
    inputs, cross_masks = {}, {}
    for name, _ in self.config.augments:
      if name not in streams:
        inputs[name], cross_masks[name] = (tokens, positions, segment_ids), shared
        continue
      stream = streams[name]
      if encoder and stream.prompt_mask is None:
        raise ValueError(f'augment_as_encoder needs the prompt_mask of stream {name!r}.')
      s_positions, s_segments = default_positions_and_segments(
          stream.tokens, stream.positions, stream.segment_ids)
      inputs[name] = (stream.tokens, s_positions, s_segments)
      cross_masks[name] = masks.aligned_cross_mask(
          stream.anchor_read_keys, stream.read_keys, segment_ids, s_segments,
          stream.prompt_mask if encoder else None, block)
    augments = self._run_augments(lambda lm, layers: lm(
        *inputs[lm.name], return_hidden=layers, compute_logits=False))
    keys_values = {name: {j: self.bridge.get(name, j).keys_values(
                              augments[name].hidden[a], inputs[name][1])
                          for j, (a, _) in enumerate(self.config.connections(name))}
                   for name, _ in self.config.augments}
    out = self._anchor(tokens, positions, self.anchor.sequence_masks(segment_ids), None,
                       keys_values, cross_masks, return_hidden,
                       compute_logits=compute_logits)
    return out._replace(cache=None)

  def prefill(self, tokens: Array, prompt_mask: Array, *, cache_length: int,
              streams: Mapping[str, AugmentStream] | None = None,
              augment_cache_length: int | None = None,
              return_hidden: Sequence[int] = ()) -> TransformerOutput:
    """Runs the prompts through every model and returns the composed cache.

    Args:
      tokens: [B, P] decoder input tokens (each row's prompt is the prefix `prompt_mask`
        marks).
      prompt_mask: [B, P] 1 on each row's prompt.
      cache_length: L >= P slots of every cache.
      streams: {name: AugmentStream} of the prompts for each augment of
        `config.own_tokenizer` (its `prompt_mask` marks each row's prompt tokens).
      augment_cache_length: slots of those augments' caches (default `cache_length`).
      return_hidden: as in `__call__`.

    Returns:
      The anchor's `TransformerOutput`: logits [B, 1, V] at each row's last prompt token and
      the composed cache (module docstring; with own-tokenizer augments also
      'read_keys': {name: [B, L_A] int32}, the read key of each slot, KEY_EMPTY where none).
    """
    streams = self._check_streams(streams)
    positions, segment_ids = default_positions_and_segments(tokens)
    encoder = self.config.augment_as_encoder
    block = self.attention_block_size
    shared = masks.cross_mask(segment_ids, prompt_mask if encoder else None, block)
    inputs, cross_masks, lengths = {}, {}, {}
    for name, _ in self.config.augments:
      if name not in streams:
        inputs[name], cross_masks[name], lengths[name] = (tokens, prompt_mask), shared, \
            cache_length
        continue
      stream = streams[name]
      if stream.prompt_mask is None:
        raise ValueError(f'prefill needs the prompt_mask of stream {name!r}.')
      inputs[name] = (stream.tokens, stream.prompt_mask)
      lengths[name] = augment_cache_length or cache_length
      cross_masks[name] = masks.aligned_cross_mask(stream.anchor_read_keys, stream.read_keys,
                                                   prompt_mask, stream.prompt_mask,
                                                   block_size=block)
    # Window rings take one token per step: not where own-tokenizer augments make the
    # anchor (and the shared augments) re-run earlier tokens.
    rings = not self.config.own_tokenizer
    augments = self._run_augments(lambda lm, layers: lm.prefill(
        *inputs[lm.name], cache_length=lengths[lm.name], return_hidden=layers,
        compute_logits=False, window_caches=rings))
    keys_values = {name: {j: self.bridge.get(name, j).keys_values(
                              augments[name].hidden[a],
                              default_positions_and_segments(inputs[name][0])[0])
                          for j, (a, _) in enumerate(self.config.connections(name))}
                   for name, _ in self.config.augments}
    out = self._anchor(tokens, positions, self.anchor.sequence_masks(segment_ids), None,
                       keys_values, cross_masks, return_hidden,
                       logits_index=last_prompt_index(prompt_mask))
    cache = {
        'anchor': self.anchor.decoding_cache(out.cache, prompt_mask, cache_length, rings),
        'augments': {name: augment.cache for name, augment in augments.items()},
        'bridge': {name: {f'block_{j}': pad_cache(keys, values, lengths[name])
                          for j, (keys, values) in blocks.items()}
                   for name, blocks in keys_values.items()},
        'prompt_length': jnp.sum(prompt_mask.astype(bool), axis=1).astype(jnp.int32)}
    if streams:
      cache['read_keys'] = {}
      for name, stream in streams.items():
        keys = jnp.where(stream.prompt_mask.astype(bool), stream.read_keys, KEY_EMPTY)
        pad = lengths[name] - keys.shape[1]
        cache['read_keys'][name] = jnp.pad(keys.astype(jnp.int32), ((0, 0), (0, pad)),
                                           constant_values=KEY_EMPTY)
    return out._replace(cache=cache)

  def extend(self, tokens: Array, positions: Array, cache: dict[str, Any], *,
             read_keys: Array | None = None, logits_index: Array | None = None,
             return_hidden: Sequence[int] = ()) -> TransformerOutput:
    """One decoding step of the composition: the new token goes through every model.

    Augments with their own tokenizer are not run here: `extend_augment` brings each up to
    the text the new token completes first; the bridges read every slot whose read key is at
    or below the new token's. A step may re-run earlier anchor tokens with the new one (K > 1)
    when what their bridges read has changed.

    Args:
      tokens: [B, K] the new tokens (K = 1 but where earlier ones are re-run).
      positions: [B, K] each row's sequence index of each token (RoPE position and slot).
      cache: the composed cache of the previous `prefill` or `extend`.
      read_keys: [B, K] the tokens' read keys (with own-tokenizer augments).
      logits_index: [B] the token of each row whose logits to return (default: all).
      return_hidden: as in `__call__`.

    Returns:
      The anchor's `TransformerOutput`: logits [B, K, V] (or [B, 1, V] at `logits_index`) and
      the extended composed cache.
    """
    own = self.config.own_tokenizer
    if own and read_keys is None:
      raise ValueError(f'extend needs the read_keys of the new tokens: augments {list(own)} '
                       'read their own tokenization.')
    bridge_slots = {name: cache['bridge'][name]['block_0']['keys'].shape[1]
                    for name, _ in self.config.augments}
    shared = [name for name, _ in self.config.augments if name not in own]
    cross_masks = {}
    if self.config.augment_as_encoder:  # The augments and bridges keep the prompt's states.
      augment_cache = dict(cache['augments'])
      bridge_cache = dict(cache['bridge'])
      for name in shared:
        cross_masks[name] = masks.prompt_cache_mask(cache['prompt_length'], bridge_slots[name])
    else:
      augments = {name: out for name, out in self._run_augments(lambda lm, layers: (
          lm.extend(tokens, positions, cache['augments'][lm.name], return_hidden=layers,
                    compute_logits=False) if lm.name not in own else None)).items()
                  if out is not None}
      augment_cache = {**cache['augments'],
                       **{name: augment.cache for name, augment in augments.items()}}
      bridge_cache = dict(cache['bridge'])
      for name, augment in augments.items():
        bridge_cache[name] = {
            f'block_{j}': write_cache(cache['bridge'][name][f'block_{j}'],
                                      *self.bridge.get(name, j).keys_values(
                                          augment.hidden[a], positions), positions)
            for j, (a, _) in enumerate(self.config.connections(name))}
        cross_masks[name] = masks.cache_mask(positions, bridge_slots[name],
                                             block_size=self.decode_block_size)
    for name in own:
      cross_masks[name] = cache['read_keys'][name][:, None, :] <= read_keys[:, :, None]
    keys_values = {name: {j: (bridge_cache[name][f'block_{j}']['keys'],
                              bridge_cache[name][f'block_{j}']['values'])
                          for j in range(len(self.config.connections(name)))}
                   for name, _ in self.config.augments}
    out = self._anchor(tokens, positions, self.anchor.cache_masks(positions, cache['anchor']),
                       cache['anchor'], keys_values, cross_masks, return_hidden, logits_index)
    new_cache = {'anchor': out.cache, 'augments': augment_cache, 'bridge': bridge_cache,
                 'prompt_length': cache['prompt_length']}
    if 'read_keys' in cache:
      new_cache['read_keys'] = cache['read_keys']
    return out._replace(cache=new_cache)

  def extend_augment(self, name: str, tokens: Array, positions: Array, read_keys: Array,
                     length: Array, cache: dict[str, Any]) -> dict[str, Any]:
    """Brings own-tokenizer augment `name` up to a longer text: re-runs its changed tail.

    Args:
      name: the augment (of `config.own_tokenizer`).
      tokens: [B, K] its new or changed decoder inputs (rows with fewer pad at the end).
      positions: [B, K] their slots (each row's from its first changed one, consecutive).
      read_keys: [B, K] their read keys.
      length: [B] each row's valid inputs after the update: slots at or above it are emptied.
      cache: the composed cache.

    Returns:
      The composed cache with the augment's, its bridges' and its read keys' slots rewritten.
    """
    if name not in self.config.own_tokenizer:
      raise ValueError(f'extend_augment is for augments with their own tokenizer, not {name!r}.')
    lm = self.augments.lms[name]
    layers = self._augment_layers()[name]
    out = lm.extend(tokens, positions, cache['augments'][name], return_hidden=layers,
                    compute_logits=False)
    bridge = {f'block_{j}': write_cache(cache['bridge'][name][f'block_{j}'],
                                        *self.bridge.get(name, j).keys_values(out.hidden[a],
                                                                              positions),
                                        positions)
              for j, (a, _) in enumerate(self.config.connections(name))}
    keys = cache['read_keys'][name]
    rows = jnp.arange(keys.shape[0])[:, None]
    keys = keys.at[rows, positions].set(read_keys.astype(jnp.int32), mode='drop')
    keys = jnp.where(jnp.arange(keys.shape[1])[None, :] < length[:, None], keys, KEY_EMPTY)
    return {**cache, 'augments': {**cache['augments'], name: out.cache},
            'bridge': {**cache['bridge'], name: bridge},
            'read_keys': {**cache['read_keys'], name: keys}}


def abstract_params(config: CalmConfig) -> Any:
  """Shapes of the whole composed tree (boxed with logical axes), without allocating."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)

  def init(t):
    streams = {name: AugmentStream(t, t, t, prompt_mask=t) for name in config.own_tokenizer}
    return Calm(config).init(jax.random.key(0), t, prompt_mask=t, streams=streams)

  return jax.eval_shape(init, tokens)['params']


def init_bridge_params(config: CalmConfig, rng: Array) -> dict[str, Any]:
  """Initial trained tree {'bridge': {name: {'block_j': ...}}}, touching no frozen model.

  Each augment's bridges share one compiled init (same shapes); bridge j of augment i uses the
  key `fold_in(fold_in(rng, i), j)`.
  """
  bridges = {}
  for i, (name, augment) in enumerate(config.augments):
    init = jax.jit(Bridge(**bridge_kwargs(config, name)).init)
    x = jnp.zeros((1, 1, config.anchor.embed_dim), jnp.dtype(config.anchor.dtype))
    h = jnp.zeros((1, 1, augment.embed_dim), jnp.dtype(augment.dtype))
    mask = jnp.ones((1, 1, 1), bool)
    key = jax.random.fold_in(rng, i)
    bridges[name] = {
        f'block_{j}': nn.unbox(init(jax.random.fold_in(key, j), x, h, mask)['params'])
        for j in range(len(config.connections(name)))}
  return {'bridge': bridges}
