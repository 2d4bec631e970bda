"""Presets at full size: shapes only, checked against transformers' own configs and counts."""

import pytest
import torch
import transformers

from calm_jax import presets
from calm_jax.convert.hf_config import config_from_hf
from calm_jax.trainable import count_params
from calm_jax.transformer import abstract_params

_LLAMA3_ROPE = dict(rope_type='llama3', low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192, rope_theta=500_000.0)

# The published config.json values of each model (the keys that matter for the architecture).
PUBLISHED = {
    'llama3_2_1b': ('llama', dict(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=dict(_LLAMA3_ROPE, factor=32.0))),
    'llama3_2_3b': ('llama', dict(
        vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters=dict(_LLAMA3_ROPE, factor=32.0))),
    'llama3_1_8b': ('llama', dict(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters=dict(_LLAMA3_ROPE, factor=8.0))),
    'mistral_7b_v0_1': ('mistral', dict(
        vocab_size=32_000, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, sliding_window=4096,
        tie_word_embeddings=False)),
    'qwen2_5_0_5b': ('qwen2', dict(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0),
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=32_768)),
    'qwen2_5_1_5b': ('qwen2', dict(
        vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0),
        tie_word_embeddings=True)),
    'qwen2_5_7b': ('qwen2', dict(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0),
        tie_word_embeddings=False)),
    'qwen3_0_6b': ('qwen3', dict(
        vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0),
        tie_word_embeddings=True)),
    'qwen3_1_7b': ('qwen3', dict(
        vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0),
        tie_word_embeddings=True)),
    'gemma_2b': ('gemma', dict(
        vocab_size=256_000, hidden_size=2048, intermediate_size=16_384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_act='gelu')),
    'gemma2_2b': ('gemma2', dict(
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    'gemma2_9b': ('gemma2', dict(
        vocab_size=256_000, hidden_size=3584, intermediate_size=14_336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    'gemma3_270m': ('gemma3_text', dict(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        sliding_window_pattern=6)),
    'gemma3_1b': ('gemma3_text', dict(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        sliding_window_pattern=6)),
    'gemma3_4b': ('gemma3_text', dict(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling=dict(rope_type='linear', factor=8.0), sliding_window_pattern=6)),
}

# Sizes everybody quotes, as a sanity check on the table above (billions, rounded).
QUOTED_BILLIONS = {'llama3_2_1b': 1.24, 'llama3_2_3b': 3.21, 'llama3_1_8b': 8.03,
                   'mistral_7b_v0_1': 7.24, 'qwen2_5_0_5b': 0.49, 'qwen2_5_1_5b': 1.54,
                   'qwen2_5_7b': 7.62, 'qwen3_0_6b': 0.60, 'qwen3_1_7b': 1.72,
                   'gemma_2b': 2.51, 'gemma2_2b': 2.61, 'gemma2_9b': 9.24, 'gemma3_270m': 0.27,
                   'gemma3_1b': 1.00,
                   'gemma3_4b': 3.88}


def test_every_preset_is_covered():
  assert set(PUBLISHED) == set(presets.PRESETS) == set(QUOTED_BILLIONS)


def _hf_config(name):
  family, kwargs = PUBLISHED[name]
  return transformers.AutoConfig.for_model(family, torch_dtype='bfloat16', **kwargs)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_preset_matches_published_config(name):
  assert config_from_hf(_hf_config(name).to_dict()) == presets.get_preset(name)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_count_matches_transformers(name):
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(name))
  expected = sum(p.numel() for p in model.parameters())
  ours = count_params(abstract_params(presets.get_preset(name)))
  assert ours == expected
  assert round(ours / 1e9, 2) == pytest.approx(QUOTED_BILLIONS[name], abs=0.011)


def test_get_preset_overrides_and_rejects_unknown():
  assert presets.get_preset('gemma2_2b', dtype='float32').dtype == 'float32'
  with pytest.raises(ValueError, match='llama3_2_1b'):
    presets.get_preset('llama-3.2-1b')
