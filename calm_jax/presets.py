"""Architectures of the published checkpoints users compose, as `TransformerConfig`s.

Values are those of each model's published `config.json`; `tests/test_presets.py` checks them
against `transformers`' own configs and parameter counts. `gin/models/<name>.gin` binds
`MODEL_CONFIG = @presets.get_preset()` with `presets.get_preset.name = '<name>'` (gin's dynamic
registration: this module does not import gin), so a gin file or flag overrides a field with
`presets.get_preset.<field> = ...`. Presets hold no weights: import a checkpoint with
`calm-convert`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from calm_jax.configs import RopeScaling, TransformerConfig

_BF16 = dict(dtype='bfloat16', param_dtype='bfloat16')


def _llama3(**kwargs) -> TransformerConfig:
  return TransformerConfig(vocab_size=128_256, num_kv_heads=8, norm_eps=1e-5,
                           rope_base=500_000.0, **_BF16, **kwargs)


def _llama3_scaling(factor: float) -> RopeScaling:
  return RopeScaling('llama3', factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position=8192)


def _qwen(**kwargs) -> TransformerConfig:
  return TransformerConfig(norm_eps=1e-6, rope_base=1_000_000.0, **_BF16, **kwargs)


def _gemma(**kwargs) -> TransformerConfig:
  return TransformerConfig(head_dim=256, activation='gelu_tanh', norm_eps=1e-6,
                           norm_plus_one=True, scale_embeddings=True, tie_embeddings=True,
                           **_BF16, **kwargs)


def _gemma2(num_layers: int, **kwargs) -> TransformerConfig:
  return _gemma(vocab_size=256_000, num_layers=num_layers, sandwich_norms=True,
                attention_types=tuple('local' if (i + 1) % 2 else 'global'
                                      for i in range(num_layers)),
                sliding_window=4096, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                query_pre_attn_scalar=256.0, **kwargs)


def _gemma3(num_layers: int, **kwargs) -> TransformerConfig:
  return _gemma(num_layers=num_layers, sandwich_norms=True, qk_norm=True,
                attention_types=tuple('local' if (i + 1) % 6 else 'global'
                                      for i in range(num_layers)),
                rope_base=1_000_000.0, local_rope_base=10_000.0, query_pre_attn_scalar=256.0,
                **kwargs)


def llama3_2_1b() -> TransformerConfig:
  """Llama-3.2-1B."""
  return _llama3(embed_dim=2048, num_layers=16, num_heads=32, head_dim=64, mlp_dim=8192,
                 rope_scaling=_llama3_scaling(32.0), tie_embeddings=True)


def llama3_2_3b() -> TransformerConfig:
  """Llama-3.2-3B."""
  return _llama3(embed_dim=3072, num_layers=28, num_heads=24, head_dim=128, mlp_dim=8192,
                 rope_scaling=_llama3_scaling(32.0), tie_embeddings=True)


def llama3_1_8b() -> TransformerConfig:
  """Llama-3.1-8B."""
  return _llama3(embed_dim=4096, num_layers=32, num_heads=32, head_dim=128, mlp_dim=14_336,
                 rope_scaling=_llama3_scaling(8.0), tie_embeddings=False)


def mistral_7b_v0_1() -> TransformerConfig:
  """Mistral-7B-v0.1 (sliding window of 4096 on every layer)."""
  return TransformerConfig(vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32,
                           num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5,
                           attention_types=('local',) * 32, sliding_window=4096,
                           tie_embeddings=False, **_BF16)


def qwen2_5_0_5b() -> TransformerConfig:
  """Qwen2.5-0.5B."""
  return _qwen(vocab_size=151_936, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
               head_dim=64, mlp_dim=4864, qkv_bias=True, tie_embeddings=True)


def qwen2_5_1_5b() -> TransformerConfig:
  """Qwen2.5-1.5B."""
  return _qwen(vocab_size=151_936, embed_dim=1536, num_layers=28, num_heads=12, num_kv_heads=2,
               head_dim=128, mlp_dim=8960, qkv_bias=True, tie_embeddings=True)


def qwen2_5_7b() -> TransformerConfig:
  """Qwen2.5-7B."""
  return _qwen(vocab_size=152_064, embed_dim=3584, num_layers=28, num_heads=28, num_kv_heads=4,
               head_dim=128, mlp_dim=18_944, qkv_bias=True, tie_embeddings=False)


def qwen3_0_6b() -> TransformerConfig:
  """Qwen3-0.6B."""
  return _qwen(vocab_size=151_936, embed_dim=1024, num_layers=28, num_heads=16, num_kv_heads=8,
               head_dim=128, mlp_dim=3072, qk_norm=True, tie_embeddings=True)


def qwen3_1_7b() -> TransformerConfig:
  """Qwen3-1.7B."""
  return _qwen(vocab_size=151_936, embed_dim=2048, num_layers=28, num_heads=16, num_kv_heads=8,
               head_dim=128, mlp_dim=6144, qk_norm=True, tie_embeddings=True)


def gemma_2b() -> TransformerConfig:
  """Gemma-2B (Gemma 1, multi-query attention)."""
  return _gemma(vocab_size=256_000, embed_dim=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                mlp_dim=16_384)


def gemma2_2b() -> TransformerConfig:
  """Gemma-2-2B."""
  return _gemma2(26, embed_dim=2304, num_heads=8, num_kv_heads=4, mlp_dim=9216)


def gemma2_9b() -> TransformerConfig:
  """Gemma-2-9B."""
  return _gemma2(42, embed_dim=3584, num_heads=16, num_kv_heads=8, mlp_dim=14_336)


def gemma3_270m() -> TransformerConfig:
  """Gemma-3-270M (also on the package index as GGUF: the `[real]` extra)."""
  return _gemma3(18, vocab_size=262_144, embed_dim=640, num_heads=4, num_kv_heads=1,
                 mlp_dim=2048, sliding_window=512)


def gemma3_1b() -> TransformerConfig:
  """Gemma-3-1B (text only)."""
  return _gemma3(26, vocab_size=262_144, embed_dim=1152, num_heads=4, num_kv_heads=1,
                 mlp_dim=6912, sliding_window=512)


def gemma3_4b() -> TransformerConfig:
  """Gemma-3-4B, its text model (the checkpoint is multimodal; `calm-convert` takes the LM)."""
  return _gemma3(34, vocab_size=262_208, embed_dim=2560, num_heads=8, num_kv_heads=4,
                 mlp_dim=10_240, sliding_window=1024, rope_scaling=RopeScaling('linear', 8.0))


PRESETS: dict[str, Callable[[], TransformerConfig]] = {
    f.__name__: f for f in (
        llama3_2_1b, llama3_2_3b, llama3_1_8b, mistral_7b_v0_1, qwen2_5_0_5b, qwen2_5_1_5b,
        qwen2_5_7b, qwen3_0_6b, qwen3_1_7b, gemma_2b, gemma2_2b, gemma2_9b, gemma3_270m,
        gemma3_1b, gemma3_4b)
}


def get_preset(name: str, **overrides: Any) -> TransformerConfig:
  """Returns preset `name`, with fields replaced by `overrides` (e.g. dtype='float32')."""
  if name not in PRESETS:
    raise ValueError(f'Unknown preset {name!r}; available: {", ".join(sorted(PRESETS))}.')
  return dataclasses.replace(PRESETS[name](), **overrides)
