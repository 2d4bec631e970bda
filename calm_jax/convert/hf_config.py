"""Translation of Hugging Face `config.json` files into `TransformerConfig`.

Accepts transformers 4.x keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`torch_dtype`, `sliding_window_pattern`) and 5.x keys (`rope_parameters`, per layer type for
Gemma 3, `dtype`, `layer_types`), and the multimodal Gemma 3 config (`text_config`). Where a key
is absent we use the default of the transformers class of that family.
"""

from __future__ import annotations

from typing import Any, Mapping

from calm_jax.configs import RopeScaling, TransformerConfig
from calm_jax.checkpoints import CheckpointError

GEMMA_FAMILIES = ('gemma', 'gemma2', 'gemma3_text')
SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3',
                         'gemma3_text')

# Defaults of the transformers config classes for keys that published configs may omit.
_DEFAULT_ROPE_BASE = {'gemma3_text': 1_000_000.0}
_DEFAULT_LOCAL_ROPE_BASE = 10_000.0
_DEFAULT_TIE = {'gemma': True, 'gemma2': True, 'gemma3_text': True}
_DEFAULT_WINDOW = {'mistral': 4096, 'gemma2': 4096, 'gemma3_text': 4096}
_DEFAULT_SOFTCAPS = {'gemma2': (50.0, 30.0)}
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh', 'gelu': 'gelu'}
_LAYER_TYPES = {'full_attention': 'global', 'sliding_attention': 'local'}
_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}


class UnsupportedModelError(CheckpointError):
  """The checkpoint's `model_type` or one of its options has no implementation here."""


def _rope(hf: Mapping[str, Any], family: str) -> tuple[float, RopeScaling | None, float | None]:
  """Returns (global base, global scaling, local base)."""
  params = hf.get('rope_parameters')
  if family == 'gemma3_text':
    if params and 'full_attention' in params:
      full, local = params['full_attention'], params.get('sliding_attention', {})
    else:
      full = dict(hf.get('rope_scaling') or {})
      full.setdefault('rope_theta', hf.get('rope_theta', _DEFAULT_ROPE_BASE[family]))
      local = {'rope_theta': hf.get('rope_local_base_freq', _DEFAULT_LOCAL_ROPE_BASE)}
    if local.get('rope_type', 'default') != 'default':
      raise UnsupportedModelError(f'Unsupported local rope_type {local["rope_type"]!r}.')
    return (float(full.get('rope_theta', _DEFAULT_ROPE_BASE[family])), _scaling(full),
            float(local.get('rope_theta', _DEFAULT_LOCAL_ROPE_BASE)))
  if params:
    return float(params.get('rope_theta', 10_000.0)), _scaling(params), None
  return float(hf.get('rope_theta', 10_000.0)), _scaling(hf.get('rope_scaling') or {}), None


def _scaling(params: Mapping[str, Any]) -> RopeScaling | None:
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return None
  if kind == 'linear':
    return RopeScaling('linear', float(params['factor']))
  if kind == 'llama3':
    return RopeScaling('llama3', float(params['factor']),
                       low_freq_factor=float(params['low_freq_factor']),
                       high_freq_factor=float(params['high_freq_factor']),
                       original_max_position=int(params['original_max_position_embeddings']))
  raise UnsupportedModelError(f'Unsupported rope_type {kind!r}; supported: linear, llama3.')


def _attention_types(hf: Mapping[str, Any], family: str, num_layers: int,
                     window: int | None) -> tuple[str, ...]:
  layer_types = hf.get('layer_types')
  if layer_types is None:
    if family == 'gemma2':
      layer_types = ['sliding_attention' if (i + 1) % 2 else 'full_attention'
                     for i in range(num_layers)]
    elif family == 'gemma3_text':
      pattern = hf.get('sliding_window_pattern', 6)
      layer_types = ['sliding_attention' if (i + 1) % pattern else 'full_attention'
                     for i in range(num_layers)]
    elif family == 'mistral' and window is not None:
      layer_types = ['sliding_attention'] * num_layers
    elif family in ('qwen2', 'qwen3') and window is not None:
      first = hf.get('max_window_layers', 28)
      layer_types = ['sliding_attention' if i >= first else 'full_attention'
                     for i in range(num_layers)]
    else:
      return ()
  unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
  if unknown:
    raise UnsupportedModelError(f'Unsupported layer_types {unknown}.')
  types = tuple(_LAYER_TYPES[t] for t in layer_types)
  return types if 'local' in types else ()


def hf_family(hf: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
  """Returns (model_type of the text model, its config dict), unwrapping multimodal Gemma 3."""
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(
        f'Unsupported model_type {model_type!r}; supported: {", ".join(SUPPORTED_MODEL_TYPES)}.')
  if model_type == 'gemma3':
    if 'text_config' not in hf:
      raise CheckpointError('Gemma 3 multimodal config.json has no text_config.')
    text = dict(hf['text_config'])
    text.setdefault('dtype', hf.get('dtype', hf.get('torch_dtype')))
    return 'gemma3_text', text
  return model_type, hf


def config_from_hf(hf: Mapping[str, Any], dtype: str | None = None) -> TransformerConfig:
  """Builds the `TransformerConfig` of a Hugging Face `config.json`.

  Args:
    hf: the parsed `config.json`.
    dtype: parameter and compute dtype; default: the checkpoint's (`dtype` / `torch_dtype`),
      float32 when unstated.

  Raises:
    UnsupportedModelError: unknown `model_type` or an option we do not implement.
    CheckpointError: a required key is missing.
  """
  family, hf = hf_family(hf)
  for key in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
              'intermediate_size'):
    if key not in hf:
      raise CheckpointError(f'config.json ({family}) lacks required key {key!r}.')
  if hf.get('mlp_bias'):
    raise UnsupportedModelError('mlp_bias=True is not supported.')
  if hf.get('use_bidirectional_attention'):
    raise UnsupportedModelError('use_bidirectional_attention=True is not supported.')
  gemma = family in GEMMA_FAMILIES
  num_layers = int(hf['num_hidden_layers'])
  num_heads = int(hf['num_attention_heads'])
  head_dim = hf.get('head_dim') or hf['hidden_size'] // num_heads
  act_name = (hf.get('hidden_activation') or hf.get('hidden_act')
              or ('gelu_pytorch_tanh' if gemma else 'silu'))
  if gemma and act_name == 'gelu':  # Legacy Gemma configs say 'gelu' but mean tanh (as HF does).
    act_name = 'gelu_pytorch_tanh'
  if act_name not in _ACTIVATIONS:
    raise UnsupportedModelError(f'Unsupported activation {act_name!r}.')
  if family in ('qwen2', 'qwen3') and not hf.get('use_sliding_window', False):
    window = None
  else:
    window = hf.get('sliding_window', _DEFAULT_WINDOW.get(family))
  attention_types = _attention_types(hf, family, num_layers, window)
  rope_base, rope_scaling, local_rope_base = _rope(hf, family)
  attn_cap, final_cap = _DEFAULT_SOFTCAPS.get(family, (None, None))
  bias = bool(hf.get('attention_bias', False)) and family != 'mistral'
  source_dtype = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  dtype = dtype or _DTYPES.get(str(source_dtype), 'float32')
  return TransformerConfig(
      vocab_size=int(hf['vocab_size']),
      embed_dim=int(hf['hidden_size']),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(hf.get('num_key_value_heads') or num_heads),
      head_dim=int(head_dim),
      mlp_dim=int(hf['intermediate_size']),
      activation=_ACTIVATIONS[act_name],
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      norm_plus_one=gemma,
      sandwich_norms=family in ('gemma2', 'gemma3_text'),
      qk_norm=family in ('qwen3', 'gemma3_text'),
      qkv_bias=family == 'qwen2' or bias,
      out_bias=bias,
      rope_base=rope_base,
      local_rope_base=local_rope_base,
      rope_scaling=rope_scaling,
      attention_types=attention_types,
      sliding_window=int(window) if attention_types else None,
      attn_logit_softcap=hf.get('attn_logit_softcapping', attn_cap),
      final_logit_softcap=hf.get('final_logit_softcapping', final_cap),
      query_pre_attn_scalar=(float(hf.get('query_pre_attn_scalar', 256))
                             if family in ('gemma2', 'gemma3_text') else None),
      scale_embeddings=gemma,
      tie_embeddings=bool(hf.get('tie_word_embeddings', _DEFAULT_TIE.get(family, False))),
      dtype=dtype,
      param_dtype=dtype,
  )
