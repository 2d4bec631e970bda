"""Typed, frozen configuration of the decoder-only language models calm_jax composes.

One `TransformerConfig` describes every family we import (Llama 2/3.x, Mistral, Qwen2/2.5,
Qwen3, Gemma 1/2/3). Only the top-level `Transformer` holds it; sub-modules take plain values.
Configs round-trip through JSON (`to_dict` / `from_dict`), which is how LM checkpoints store them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')
ATTENTION_TYPES = ('global', 'local')
ROPE_SCALINGS = ('linear', 'llama3')
DTYPES = ('float32', 'bfloat16', 'float16')


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
