"""Attention masks: causal, padding, segment and window, for self- and cross-attention.

Every mask is boolean, True where a query may attend a key: [B, T, S] for a full forward pass
(T queries over S = T keys of the same tokens) and [B, 1, L] for a decoding step (one new query
per row over the L slots of a cache). The models build them once per forward pass here and pass
them down; attention modules never build their own.

Conventions (DESIGN.md): a query attends keys at or before it in its sequence (causal), of its
own segment (packing), that are real tokens (segment id != 0); in a sliding-window layer only
the last `window` of them. Cache slot s holds the token at sequence index s of its row, so a
decoding step at index p reads slots s <= p. The composition's cross-attention uses the same
rule between anchor and augment positions (the augment reads the same tokens); its encoder
ablation restricts the keys to the prompt.
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp

Array = jax.Array


@struct.dataclass
class KeyedMask:
  """A full-forward-pass mask given by what it is made of, for blocked attention
  (`calm_jax.blocked_attention`): `attention_mask(q_keys, kv_keys, q_segment_ids,
  kv_segment_ids, window) & kv_mask`, never materialised unless asked (`materialize`).

  `sequence_mask`, `cross_mask` and `aligned_cross_mask` build one and return it as it is when
  given a block size, materialised otherwise: one definition of each mask for both paths.

  Attributes:
    q_keys, kv_keys: [B, T], [B, S] indices, or read keys (two tokenizations).
    q_segment_ids, kv_segment_ids: [B, T], [B, S]; 0 marks padding.
    kv_mask: [B, S] bool keys no query may see are False, or None.
    window: sliding window, or None (static).
    block_size: keys per block of the attention that reads it, or None: materialise it
      (static).
  """

  q_keys: Array
  kv_keys: Array
  q_segment_ids: Array
  kv_segment_ids: Array
  kv_mask: Array | None = None
  window: int | None = struct.field(pytree_node=False, default=None)
  block_size: int | None = struct.field(pytree_node=False, default=None)

  def materialize(self) -> Array:
    """The [B, T, S] boolean mask."""
    mask = attention_mask(self.q_keys, self.kv_keys, self.q_segment_ids, self.kv_segment_ids,
                          self.window)
    if self.kv_mask is not None:
      mask &= self.kv_mask[:, None, :].astype(bool)
    return mask

  def resolved(self) -> Array | KeyedMask:
    """Itself for blocked attention (a block size), else the [B, T, S] mask."""
    return self if self.block_size else self.materialize()


def attention_mask(q_index: Array, kv_index: Array, q_segment_ids: Array,
                   kv_segment_ids: Array, window: int | None = None) -> Array:
  """Boolean mask [B, T, S]: which key each query may attend.

  Query i sees key j when j <= i (causal, by index in the sequence), both lie in the same
  segment, the key is a real token (segment id != 0) and, with a window, i - j < window.

  Args:
    q_index: [B, T] index of each query in its sequence.
    kv_index: [B, S] index of each key.
    q_segment_ids: [B, T] segment of each query; 0 marks padding.
    kv_segment_ids: [B, S] segment of each key; 0 marks padding.
    window: sliding-window size, or None for unlimited.
  """
  q = q_index[:, :, None]
  k = kv_index[:, None, :]
  mask = (k <= q) & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  mask &= kv_segment_ids[:, None, :] != 0
  if window is not None:
    mask &= q - k < window
  return mask


def sequence_mask(segment_ids: Array, window: int | None = None,
                  block_size: int | None = None) -> Array | KeyedMask:
  """[B, T, T] mask of a full forward pass over `segment_ids` [B, T] (0: padding); with
  `block_size`, the same as a `KeyedMask` for blocked attention."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
  return KeyedMask(index, index, segment_ids, segment_ids, window=window,
                   block_size=block_size).resolved()


def cross_mask(segment_ids: Array, prompt_mask: Array | None = None,
               block_size: int | None = None) -> Array | KeyedMask:
  """[B, T, S] mask of the bridges' cross-attention in a full forward pass.

  Args:
    segment_ids: [B, T] segments of the tokens both models read (0: padding).
    prompt_mask: [B, T] 1 on prompt tokens: the keys are then the prompt's only (the
      `augment_as_encoder` ablation); None: every earlier augment position.
    block_size: return a `KeyedMask` for blocked attention instead.
  """
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
  return KeyedMask(index, index, segment_ids, segment_ids,
                   None if prompt_mask is None else prompt_mask.astype(bool),
                   block_size=block_size).resolved()


def aligned_cross_mask(anchor_read_keys: Array, augment_read_keys: Array,
                       anchor_segment_ids: Array, augment_segment_ids: Array,
                       augment_prompt_mask: Array | None = None,
                       block_size: int | None = None) -> Array | KeyedMask:
  """[B, T, S] cross mask between two tokenizations of one text (`calm_jax.alignment`).

  Anchor input t may read augment input s when the augment's read key is at or below the
  anchor's (it has read no byte the anchor has not), both are real tokens of the same segment
  and, for the encoder ablation, s is in the augment's prompt. With one tokenization (equal,
  strictly increasing keys) this is `cross_mask`.

  Args:
    anchor_read_keys: [B, T]; augment_read_keys: [B, S] (int32).
    anchor_segment_ids: [B, T]; augment_segment_ids: [B, S] (0: padding).
    augment_prompt_mask: [B, S] 1 on the augment's prompt tokens, or None.
    block_size: return a `KeyedMask` for blocked attention instead.
  """
  return KeyedMask(anchor_read_keys, augment_read_keys, anchor_segment_ids, augment_segment_ids,
                   None if augment_prompt_mask is None else augment_prompt_mask.astype(bool),
                   block_size=block_size).resolved()


@struct.dataclass
class CacheMask:
  """The mask of a decoding step over a cache of `slots` slots, by what it is made of.

  A cache is a ring: the token at sequence index q lives in slot q mod `slots`. A global
  layer's cache has a slot for every index the decode reaches (prompt + tokens to decode), so
  slot s holds index s; a sliding-window layer's cache has `window` slots (DESIGN.md), so
  each step overwrites the token that just left the window. Either way, at index p slot s
  holds index q = p - ((p - s) mod slots), the latest index at or before p that maps to it;
  q < 0 means nothing before p was written there (stale slots of a padded prefill included).

  Attributes:
    positions: [B, K] sequence index of each new token.
    slots: slots of the cache (static).
    window: sliding window, or None (static).
    block_size: attend the cache in blocks of this many slots, only as far as the slots
      written so far (`blocked_attention.cached_attention`: a step's cost follows the current
      length), or None: over all slots through the materialised mask (static).
  """

  positions: Array
  slots: int = struct.field(pytree_node=False)
  window: int | None = struct.field(pytree_node=False, default=None)
  block_size: int | None = struct.field(pytree_node=False, default=None)

  def slot_indices(self, slots: Array) -> Array:
    """[B, K, S] the sequence index each of `slots` [S] holds for each query (< 0: none)."""
    p = self.positions[:, :, None]
    return p - jnp.mod(p - slots[None, None, :], self.slots)

  def visible(self, slots: Array) -> Array:
    """[B, K, S] whether each query may read each of `slots` [S]."""
    q = self.slot_indices(slots)
    mask = q >= 0
    if self.window is not None:
      mask &= self.positions[:, :, None] - q < self.window
    return mask

  def materialize(self) -> Array:
    """The [B, K, L] boolean mask over every slot."""
    return self.visible(jnp.arange(self.slots))

  def write_index(self) -> Array:
    """[B, K] the slot each new token is written to (an index past a global cache's end is
    dropped; it wraps only in a window's ring)."""
    if self.window is not None and self.slots <= self.window:
      return jnp.mod(self.positions, self.slots)
    return self.positions

  def slots_in_use(self) -> Array:
    """int32 scalar: how many leading slots any row may read (min(max index + 1, slots))."""
    return jnp.minimum(jnp.max(self.positions) + 1, self.slots).astype(jnp.int32)


def cache_mask(positions: Array, cache_length: int, window: int | None = None,
               block_size: int | None = None) -> CacheMask:
  """The mask of a decoding step: the new tokens at `positions` [B, K] read the slots at or
  before them (the last `window` of them with a window), of a cache of `cache_length` slots
  (`CacheMask`; `.materialize()` is the [B, K, L] boolean mask)."""
  return CacheMask(positions, int(cache_length), window, block_size)


def prompt_cache_mask(prompt_length: Array, cache_length: int) -> Array:
  """[B, 1, L] mask of the encoder ablation's decoding step: the first `prompt_length` [B] slots."""
  return jnp.arange(cache_length)[None, None, :] < prompt_length[:, None, None]
