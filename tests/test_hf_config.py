"""Tests of `hf_config.config_from_hf`: transformers 4.x/5.x keys, defaults and rejections."""


import pytest
import transformers

from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import RopeScaling
from calm_jax.convert import hf_config
from calm_jax.convert.hf_config import UnsupportedModelError, config_from_hf

_SIZES = dict(vocab_size=101, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, head_dim=16)
_LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}


def _hf(model_type, **kwargs):
  """A minimal Hugging Face config dict of `model_type` with `_SIZES` and `kwargs`."""
  return {'model_type': model_type, **_SIZES, **kwargs}


def test_llama_v4_and_v5_keys_agree():
  """`rope_theta` + `rope_scaling` + `torch_dtype` (4.x) equal `rope_parameters` + `dtype`."""
  v4 = config_from_hf(_hf('llama', rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE),
                          torch_dtype='bfloat16'))
  v5 = config_from_hf(_hf('llama', rope_parameters={**_LLAMA3_ROPE, 'rope_theta': 500000.0},
                          dtype='bfloat16'))
  assert v4 == v5
  assert v5.rope_base == 500000.0
  assert v5.rope_scaling == RopeScaling('llama3', 32.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position=8192)
  assert v5.param_dtype == v5.dtype == 'bfloat16'


def test_rope_scaling_legacy_type_key():
  """Old configs spell `rope_type` as `type` in `rope_scaling`."""
  legacy = dict(_LLAMA3_ROPE)
  legacy['type'] = legacy.pop('rope_type')
  old = config_from_hf(_hf('llama', rope_theta=500000.0, rope_scaling=legacy))
  new = config_from_hf(_hf('llama', rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE)))
  assert old == new
  assert old.rope_scaling.kind == 'llama3'


def test_gemma3_v4_and_v5_keys_agree():
  """Gemma 3's 4.x `rope_local_base_freq` + pattern equal 5.x per-layer-type rope parameters."""
  v4 = config_from_hf(_hf('gemma3_text', rope_theta=1e6, rope_local_base_freq=1e4,
                          rope_scaling={'rope_type': 'linear', 'factor': 8.0},
                          sliding_window_pattern=6))
  v5 = config_from_hf(_hf(
      'gemma3_text',
      rope_parameters={
          'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
          'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}},
      layer_types=['sliding_attention'] * 5 + ['full_attention']))
  assert v4 == v5
  assert v5.attention_types == ('local',) * 5 + ('global',)
  assert (v5.rope_base, v5.local_rope_base) == (1e6, 1e4)
  assert v5.rope_scaling == RopeScaling('linear', 8.0)


def test_gemma3_multimodal_wrapper():
  """The multimodal `gemma3` config maps to its `text_config`, taking the outer dtype."""
  text = _hf('gemma3_text', sliding_window=512, query_pre_attn_scalar=256)
  wrapped = config_from_hf({'model_type': 'gemma3', 'text_config': text,
                            'torch_dtype': 'bfloat16'})
  assert wrapped == config_from_hf({**text, 'dtype': 'bfloat16'})
  assert wrapped.param_dtype == 'bfloat16'


_DEFAULT_FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text')


def _from_transformers(family):
  """`config_from_hf` of transformers' own config dict of `family` with `_SIZES`."""
  return config_from_hf(transformers.AutoConfig.for_model(family, **_SIZES).to_dict())


@pytest.mark.parametrize('family', _DEFAULT_FAMILIES)
def test_defaults_match_transformers(family):
  """Keys a config omits get the defaults of the transformers config class of the family.

  """
  minimal = config_from_hf(_hf(family))
  full = _from_transformers(family)
  assert full == minimal


@pytest.mark.parametrize('family', _DEFAULT_FAMILIES)
def test_default_activation_matches_transformers(family):
  """Without an activation key, the family's transformers default activation is used."""
  assert config_from_hf(_hf(family)).activation == _from_transformers(family).activation


def test_legacy_gemma_gelu_means_tanh():
  """Gemma 1 configs say `hidden_act='gelu'` but mean the tanh approximation."""
  assert config_from_hf(_hf('gemma', hidden_act='gelu')).activation == 'gelu_tanh'


def test_qwen2_sliding_window_off():
  """Qwen2's `sliding_window` is ignored unless `use_sliding_window` is set."""
  config = config_from_hf(_hf('qwen2', use_sliding_window=False, sliding_window=4096,
                              max_window_layers=2))
  assert config.attention_types == ()
  assert config.sliding_window is None
  on = config_from_hf(_hf('qwen2', use_sliding_window=True, sliding_window=4096,
                          max_window_layers=2))
  assert on.attention_types == ('global',) * 2 + ('local',) * 4


def test_mistral_without_window_is_global():
  """Mistral with `sliding_window=None` (e.g. Mistral v0.2+) has only global layers."""
  config = config_from_hf(_hf('mistral', sliding_window=None))
  assert config.attention_types == ()
  assert config.sliding_window is None


def test_gemma2_alternates_starting_local():
  """Gemma 2 without `layer_types` alternates local and global layers, local first."""
  config = config_from_hf(_hf('gemma2', sliding_window=4096))
  assert config.attention_types == ('local', 'global') * 3
  assert config.sliding_window == 4096


def test_unsupported_rope_type():
  """A rope type we do not implement is rejected, naming it."""
  with pytest.raises(UnsupportedModelError, match='yarn'):
    config_from_hf(_hf('llama', rope_scaling={'rope_type': 'yarn', 'factor': 4.0}))


def test_mlp_bias_unsupported():
  """`mlp_bias=True` has no implementation here."""
  with pytest.raises(UnsupportedModelError, match='mlp_bias'):
    config_from_hf(_hf('llama', mlp_bias=True))


def test_unknown_model_type():
  """An unknown model type names itself and the supported ones."""
  with pytest.raises(UnsupportedModelError, match="'gpt_neox'.*supported: llama") as info:
    config_from_hf(_hf('gpt_neox'))
  assert all(t in str(info.value) for t in hf_config.SUPPORTED_MODEL_TYPES)


def test_missing_required_key():
  """A config without `hidden_size` is an error naming that key."""
  hf = _hf('llama')
  del hf['hidden_size']
  with pytest.raises(CheckpointError, match='hidden_size'):
    config_from_hf(hf)
