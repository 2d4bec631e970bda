"""Typed, frozen configuration of the decoder-only language models calm_jax composes.

One `TransformerConfig` describes every family we import (Llama 2/3.x, Mistral, Qwen2/2.5,
Qwen3, Gemma 1/2/3). Only the top-level `Transformer` holds it; sub-modules take plain values.
Configs round-trip through JSON (`to_dict` / `from_dict`), which is how LM checkpoints store them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')
ATTENTION_TYPES = ('global', 'local')
ROPE_SCALINGS = ('linear', 'llama3')
DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling for long contexts (applied to global layers only).

  Attributes:
    kind: 'linear' (all frequencies divided by `factor`, Gemma 3) or 'llama3' (low frequencies
      divided by `factor`, high ones kept, a smooth blend between; Llama 3.1/3.2).
    factor: the context extension factor.
    low_freq_factor: Llama 3 only.
    high_freq_factor: Llama 3 only.
    original_max_position: Llama 3 only: the pre-extension context length.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f'RopeScaling.kind must be one of {ROPE_SCALINGS}, got {self.kind!r}.')
    if self.factor <= 0:
      raise ValueError(f'RopeScaling.factor must be positive, got {self.factor}.')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of one decoder-only LM.

  Attributes:
    vocab_size: V, rows of the embedding table.
    embed_dim: D, width of the residual stream.
    num_layers: number of decoder layers (`layer_0` ... `layer_{n-1}`).
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (K < N is GQA, K == 1 is MQA); must divide N.
    head_dim: H, independent of D (Gemma uses 256 with D = 2304).
    mlp_dim: F, hidden width of the gated MLP.
    activation: 'silu' (Llama, Qwen, Mistral) or 'gelu_tanh' (Gemma) or exact 'gelu'.
    gated_mlp: `act(x W_gate) * (x W_up)` if True, else `act(x W_up)`.
    norm_eps: RMSNorm epsilon.
    norm_plus_one: Gemma's RMSNorm scales by `1 + w` (weights stored centred on 0).
    sandwich_norms: Gemma 2/3 norms after attention and after the MLP, before the residual add.
    qk_norm: RMSNorm over the head dim of queries and keys before RoPE (Qwen3, Gemma 3).
    qkv_bias: biases on the query/key/value projections (Qwen2/2.5).
    out_bias: bias on the attention output projection (Llama with `attention_bias`).
    rope_base: RoPE base frequency of global layers.
    local_rope_base: RoPE base of sliding-window layers (Gemma 3); None means `rope_base`.
    rope_scaling: frequency scaling of global layers, or None.
    attention_types: one of 'global' / 'local' per layer; empty means all global.
    sliding_window: window of 'local' layers: query i sees keys j with i - window < j <= i.
    attn_logit_softcap: `c * tanh(logits / c)` on attention logits (Gemma 2), or None.
    final_logit_softcap: the same on output logits (Gemma 2), or None.
    query_pre_attn_scalar: queries are scaled by `query_pre_attn_scalar ** -0.5`;
      None means `head_dim ** -0.5`.
    scale_embeddings: multiply embeddings by `sqrt(embed_dim)` (Gemma).
    tie_embeddings: the output projection is the input embedding table.
    dtype: compute dtype of activations.
    param_dtype: storage dtype of parameters.
    embedding_init_scale: models trained from scratch start with embeddings of standard
      deviation embedding_init_scale / sqrt(embed_dim) (imported checkpoints ignore it).
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = 'silu'
  gated_mlp: bool = True
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  rope_base: float = 10_000.0
  local_rope_base: float | None = None
  rope_scaling: RopeScaling | None = None
  attention_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  scale_embeddings: bool = False
  tie_embeddings: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  embedding_init_scale: float = 1.0

  def __post_init__(self):
    # Normalise lists (JSON, gin) to tuples so that configs stay hashable and comparable.
    object.__setattr__(self, 'attention_types', tuple(self.attention_types))
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))
    for name in ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim', 'mlp_dim'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'TransformerConfig.{name} must be a positive int, got {value!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'TransformerConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads '
          f'({self.num_heads}).')
    if self.head_dim % 2:
      raise ValueError(f'TransformerConfig.head_dim must be even for RoPE, got {self.head_dim}.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f'TransformerConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f'TransformerConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}.')
    if self.attention_types:
      if len(self.attention_types) != self.num_layers:
        raise ValueError(
            f'TransformerConfig.attention_types has {len(self.attention_types)} entries for '
            f'{self.num_layers} layers.')
      unknown = set(self.attention_types) - set(ATTENTION_TYPES)
      if unknown:
        raise ValueError(
            f'TransformerConfig.attention_types: unknown {sorted(unknown)}; use {ATTENTION_TYPES}.')
      if 'local' in self.attention_types and not self.sliding_window:
        raise ValueError('TransformerConfig: local attention layers need a sliding_window.')
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(
          f'TransformerConfig.sliding_window must be positive, got {self.sliding_window}.')

  def attention_type(self, layer: int) -> str:
    """Returns 'global' or 'local' for 0-based `layer`."""
    return self.attention_types[layer] if self.attention_types else 'global'

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of 0-based `layer`, None for a global layer."""
    return self.sliding_window if self.attention_type(layer) == 'local' else None

  def layer_windows(self) -> tuple[int | None, ...]:
    """The distinct `layer_window`s of the layers (one attention mask each)."""
    return tuple(dict.fromkeys(self.layer_window(i) for i in range(self.num_layers)))

  def differences(self, other: TransformerConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ, as {name: (self's, other's)}."""
    return {f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)}

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict; `from_dict` inverts it."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
    """Builds a config from `to_dict`'s output; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f'Unknown TransformerConfig fields {unknown}.')
    return cls(**data)

  def to_json(self) -> str:
    """Returns the config as indented JSON."""
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> TransformerConfig:
    """Parses `to_json`'s output."""
    return cls.from_dict(json.loads(text))


def paper_connections(num_augment_layers: int, num_anchor_layers: int,
                      every: int = 4) -> tuple[tuple[int, int], ...]:
  """The paper's rule (section 4): every `every`-th augment layer, anchor layers evenly spaced.

  With n = N_A // k: L_A = {k, 2k, ..., nk} and L_B = {round(j * N_B / n) : j = 1..n}, where
  round is half-up (so that the rule does not depend on Python's banker's rounding).

  Returns:
    n pairs (augment_layer, anchor_layer), 1-indexed "after layer" counts.
  """
  n = num_augment_layers // every
  if n < 1:
    raise ValueError(f'every={every} exceeds the augment depth {num_augment_layers}: no bridge.')
  return tuple((every * j, int(math.floor(j * num_anchor_layers / n + 0.5)))
               for j in range(1, n + 1))


_RENAMED_BRIDGE_FIELDS = {'query_norm': 'use_query_norm', 'kv_norm': 'use_kv_norm'}


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
  """The bridges from one augmenting model into the anchor.

  Attributes:
    connections: explicit (augment_layer, anchor_layer) pairs, 1-indexed: bridge j reads the
      augment's residual stream after layer a_j and adds to the anchor's after layer b_j
      (b_j = 0: to the anchor's embedding, before its first layer, so that every anchor layer
      can use what the bridge brings). Empty means the paper's rule with `every`.
    every: k of the paper's every-k rule.
    num_heads: cross-attention heads; None means the anchor's.
    num_kv_heads: key/value heads (GQA); None means `num_heads`.
    head_dim: None means anchor width // num_heads.
    use_query_norm: RMSNorm on the anchor states before the query projection.
    use_kv_norm: RMSNorm on the projected augment states P_j.
    zero_init_out: W_o starts at zero, so the untrained composition is exactly the anchor.
    norm_eps: epsilon of both norms.
    rope_base: if set, rotary position embeddings (this base) on the bridge's queries (anchor
      positions) and keys (augment positions), so a bridge can attend by relative position
      ("the augment at my position"); None, the paper's bridge, attends by content only.
  """

  connections: tuple[tuple[int, int], ...] = ()
  every: int = 4
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  use_query_norm: bool = True
  use_kv_norm: bool = True
  zero_init_out: bool = True
  norm_eps: float = 1e-6
  rope_base: float | None = None

  def __post_init__(self):
    object.__setattr__(self, 'connections',
                       tuple(tuple(int(x) for x in pair) for pair in self.connections))
    if any(len(pair) != 2 for pair in self.connections):
      raise ValueError(f'BridgeConfig.connections must be (augment_layer, anchor_layer) pairs, '
                       f'got {self.connections}.')
    if self.every < 1:
      raise ValueError(f'BridgeConfig.every must be >= 1, got {self.every}.')

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict; `from_dict` inverts it."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> BridgeConfig:
    """Builds a config from `to_dict`'s output; unknown keys are an error.

    Files written before the norm switches were renamed (`query_norm`, `kv_norm`) still load.
    """
    data = {_RENAMED_BRIDGE_FIELDS.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'Unknown BridgeConfig fields {unknown}.')
    return cls(**data)

  def resolve(self, augment: TransformerConfig,
              anchor: TransformerConfig) -> tuple[tuple[int, int], ...]:
    """The connections for this augment/anchor pair (explicit, else the every-k rule)."""
    if self.connections:
      return self.connections
    return paper_connections(augment.num_layers, anchor.num_layers, self.every)

  def heads(self, anchor: TransformerConfig) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of the cross-attention, defaults resolved."""
    num_heads = self.num_heads or anchor.num_heads
    if self.head_dim is None and anchor.embed_dim % num_heads:
      raise ValueError(f'Bridge heads ({num_heads}) do not divide the anchor width '
                       f'({anchor.embed_dim}); set head_dim or another num_heads.')
    head_dim = self.head_dim or anchor.embed_dim // num_heads
    num_kv_heads = self.num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f'Bridge num_kv_heads ({num_kv_heads}) must divide num_heads '
                       f'({num_heads}).')
    return num_heads, num_kv_heads, head_dim


def paper_bridge() -> BridgeConfig:
  """The paper's bridges: no query or key/value norms (W_o still starts at zero)."""
  return BridgeConfig(use_query_norm=False, use_kv_norm=False)


_RESERVED_NAMES = frozenset({'name', 'parent', 'config', 'scope', 'variables', 'params'})


@dataclasses.dataclass(frozen=True)
class CalmConfig:
  """A composition: one anchor, any number of named augmenting models, their bridges.

  Attributes:
    anchor: the anchor LM (m_B), whose outputs are the composition's.
    augments: (name, config) of each augmenting LM (m_A), in the order their bridges apply.
      A mapping is accepted and kept in its order.
    bridges: (name, BridgeConfig) per augment; an augment without one gets `BridgeConfig()`.
    augment_as_encoder: ablation: the anchor may read the augment only over the prompt.
    own_tokenizer: names of the augments that read the text in their own tokenization (their
      own vocabulary; `calm_jax.alignment` places both streams on the text). The others read
      the anchor's tokens and share its vocabulary.
  """

  anchor: TransformerConfig
  augments: tuple[tuple[str, TransformerConfig], ...]
  bridges: tuple[tuple[str, BridgeConfig], ...] = ()
  augment_as_encoder: bool = False
  own_tokenizer: tuple[str, ...] = ()

  def __post_init__(self):
    augments = tuple(self.augments.items() if isinstance(self.augments, Mapping)
                     else self.augments)
    bridges = dict(self.bridges.items() if isinstance(self.bridges, Mapping) else self.bridges)
    if not augments:
      raise ValueError('CalmConfig needs at least one augment.')
    names = [name for name, _ in augments]
    if len(set(names)) != len(names):
      raise ValueError(f'CalmConfig: augment names must be unique, got {names}.')
    for name in names:
      if not name.isidentifier() or name in _RESERVED_NAMES:
        raise ValueError(f'CalmConfig: augment name {name!r} must be a Python identifier and '
                         f'not one of {sorted(_RESERVED_NAMES)}.')
    unknown = sorted(set(bridges) - set(names))
    if unknown:
      raise ValueError(f'CalmConfig: bridges for unknown augment(s) {unknown}; augments are '
                       f'{names}.')
    bridges = tuple((name, bridges.get(name, BridgeConfig())) for name in names)
    own = tuple(self.own_tokenizer)
    unknown = sorted(set(own) - set(names))
    if unknown:
      raise ValueError(f'CalmConfig: own_tokenizer names unknown augment(s) {unknown}; '
                       f'augments are {names}.')
    object.__setattr__(self, 'augments', augments)
    object.__setattr__(self, 'bridges', bridges)
    object.__setattr__(self, 'own_tokenizer', tuple(n for n in names if n in own))
    for name, augment in augments:
      bridge = dict(bridges)[name]
      if name in own:
        if bridge.rope_base is not None:
          raise ValueError(f'CalmConfig: augment {name!r} has its own tokenizer, so its '
                           'positions are not the anchor\'s: its bridges cannot use rope_base.')
      elif augment.vocab_size != self.anchor.vocab_size:
        raise ValueError(f'CalmConfig: augment {name!r} has vocab {augment.vocab_size}, the '
                         f'anchor {self.anchor.vocab_size}; an augment with another vocabulary '
                         'reads its own tokenization (own_tokenizer).')
      bridge.heads(self.anchor)
      for a, b in bridge.resolve(augment, self.anchor):
        if not 1 <= a <= augment.num_layers:
          raise ValueError(f'CalmConfig: connection ({a}, {b}) of {name!r} reads augment layer '
                           f'{a}, outside 1..{augment.num_layers}.')
        if not 0 <= b <= self.anchor.num_layers:
          raise ValueError(f'CalmConfig: connection ({a}, {b}) of {name!r} writes anchor layer '
                           f'{b}, outside 0..{self.anchor.num_layers}.')

  def connections(self, name: str) -> tuple[tuple[int, int], ...]:
    """Resolved (augment_layer, anchor_layer) pairs of augment `name`."""
    return dict(self.bridges)[name].resolve(dict(self.augments)[name], self.anchor)

  def first_bridged_layer(self) -> int:
    """The lowest anchor layer any bridge writes to: nothing below it is differentiated."""
    return min(b for name, _ in self.augments for _, b in self.connections(name))

  def bridge(self, name: str) -> BridgeConfig:
    """The BridgeConfig of augment `name`."""
    if name not in dict(self.bridges):
      raise KeyError(f'Unknown augment {name!r}; augments are {[n for n, _ in self.augments]}.')
    return dict(self.bridges)[name]

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict (augments in order); `from_dict` inverts it."""
    return {'anchor': self.anchor.to_dict(),
            'augments': [[name, config.to_dict()] for name, config in self.augments],
            'bridges': [[name, bridge.to_dict()] for name, bridge in self.bridges],
            'augment_as_encoder': self.augment_as_encoder,
            'own_tokenizer': list(self.own_tokenizer)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> CalmConfig:
    """Builds a config from `to_dict`'s output; unknown keys are an error."""
    unknown = sorted(set(data) - {'anchor', 'augments', 'bridges', 'augment_as_encoder',
                                  'own_tokenizer'})
    if unknown:
      raise ValueError(f'Unknown CalmConfig fields {unknown}.')
    bridges = []
    for name, bridge in data.get('bridges', ()):
      try:
        bridges.append((name, BridgeConfig.from_dict(bridge)))
      except ValueError as e:
        raise ValueError(f'{e} (augment {name!r}).') from e
    return cls(anchor=TransformerConfig.from_dict(data['anchor']),
               augments=tuple((name, TransformerConfig.from_dict(config))
                              for name, config in data['augments']),
               bridges=tuple(bridges),
               augment_as_encoder=bool(data.get('augment_as_encoder', False)),
               own_tokenizer=tuple(data.get('own_tokenizer', ())))
