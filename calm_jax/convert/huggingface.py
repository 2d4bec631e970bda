"""Import of Hugging Face checkpoints (Llama, Mistral, Qwen2/3, Gemma 1/2/3) into calm_jax.

Every parameter of our tree is looked up under its Hugging Face name and reshaped:
projections `[out, in]` become `[in, ...]` with heads split out (`q_proj` [N*H, D] ->
`query` [D, N, H]); row order is kept, so RoPE uses the halves layout (see `layers.apply_rope`).
Missing tensors, tensors of the wrong shape and unexpected tensors are errors that name them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from calm_jax import checkpoints
from calm_jax.configs import TransformerConfig
from calm_jax.convert.hf_config import config_from_hf
from calm_jax.checkpoints import CheckpointError
from calm_jax.convert.safetensors_reader import SafetensorsReader
from calm_jax.transformer import abstract_params

# Prefixes of text-model tensors in multimodal checkpoints, mapped to the plain LM's prefixes:
# transformers 4.x writes `language_model.model.*`, 5.x writes `model.language_model.*`.
_PREFIXES = (('model.language_model.', 'model.'), ('language_model.model.', 'model.'),
             ('language_model.lm_head.', 'lm_head.'))
# Tensors of other towers and non-persistent buffers: present in some checkpoints, not ours.
_IGNORED = re.compile(r'^(model\.)?(vision_tower|multi_modal_projector|audio_tower)\.'
                      r'|\.rotary_emb\.inv_freq$')

_LAYER_NAMES = {
    ('pre_attention_norm', 'scale'): 'input_layernorm.weight',
    ('post_attention_norm', 'scale'): 'post_attention_layernorm.weight',
    ('post_ffw_norm', 'scale'): 'post_feedforward_layernorm.weight',
    ('attn', 'query'): 'self_attn.q_proj.weight',
    ('attn', 'key'): 'self_attn.k_proj.weight',
    ('attn', 'value'): 'self_attn.v_proj.weight',
    ('attn', 'out'): 'self_attn.o_proj.weight',
    ('attn', 'query_bias'): 'self_attn.q_proj.bias',
    ('attn', 'key_bias'): 'self_attn.k_proj.bias',
    ('attn', 'value_bias'): 'self_attn.v_proj.bias',
    ('attn', 'out_bias'): 'self_attn.o_proj.bias',
    ('attn', 'query_norm', 'scale'): 'self_attn.q_norm.weight',
    ('attn', 'key_norm', 'scale'): 'self_attn.k_norm.weight',
    ('mlp', 'gating'): 'mlp.gate_proj.weight',
    ('mlp', 'up'): 'mlp.up_proj.weight',
    ('mlp', 'down'): 'mlp.down_proj.weight',
}


def to_ours(path: tuple[str, ...], shape: tuple[int, ...]):
  """Returns (Hugging Face shape, function HF array -> our array) for parameter `path`."""
  leaf = path[-1]
  if leaf in ('query', 'key', 'value'):  # [N*H, D] -> [D, N, H]
    return (shape[1] * shape[2], shape[0]), lambda w: w.T.reshape(shape)
  if leaf == 'out':  # [D, N*H] -> [N, H, D]
    return (shape[2], shape[0] * shape[1]), lambda w: w.T.reshape(shape)
  if leaf in ('gating', 'up', 'down'):  # [out, in] -> [in, out]
    return shape[::-1], lambda w: w.T
  if leaf.endswith('_bias') and len(shape) == 2:  # [N*H] -> [N, H]
    return (shape[0] * shape[1],), lambda w: w.reshape(shape)
  return shape, lambda w: w


def hf_name(path: tuple[str, ...], config: TransformerConfig) -> str:
  """The Hugging Face tensor name of our parameter `path` (e.g. ('layer_0', 'mlp', 'up'))."""
  if path == ('embedder', 'input_embedding'):
    return 'model.embed_tokens.weight'
  if path == ('embedder', 'output_embedding'):
    return 'lm_head.weight'
  if path == ('final_norm', 'scale'):
    return 'model.norm.weight'
  match = re.fullmatch(r'layer_(\d+)', path[0])
  rest = path[1:]
  if match is None or (rest not in _LAYER_NAMES and rest != ('pre_ffw_norm', 'scale')):
    raise KeyError(f'No Hugging Face name for parameter {"/".join(path)}.')
  if rest == ('pre_ffw_norm', 'scale'):
    # Llama's `post_attention_layernorm` is the pre-MLP norm; Gemma 2/3 have a separate one.
    name = ('pre_feedforward_layernorm.weight' if config.sandwich_norms
            else 'post_attention_layernorm.weight')
  else:
    name = _LAYER_NAMES[rest]
  return f'model.layers.{match.group(1)}.{name}'


def _canonical(name: str) -> str:
  for old, new in _PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def check_expected(config: TransformerConfig, expected: TransformerConfig | None,
                   source: str) -> None:
  """Raises a CheckpointError unless `config` is `expected` (dtypes aside; None: anything)."""
  if expected is None:
    return
  expected = dataclasses.replace(expected, dtype=config.dtype, param_dtype=config.param_dtype)
  if config != expected:
    raise CheckpointError(f'{source} is not the expected architecture: (checkpoint, expected) '
                          f'= {config.differences(expected)}.')


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """Parses `hf_dir/config.json`, with a clear error if it is missing or malformed."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f'Checkpoint directory {hf_dir} does not exist.')
  if not os.path.exists(path):
    raise CheckpointError(f'No config.json in {hf_dir}.')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e}).') from e


def load_hf_params(hf_dir: str, config: TransformerConfig,
                   on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Reads the weights of `hf_dir` into our parameter tree of numpy arrays.

  Arrays stay memory-mapped views of the files where no cast is needed.

  Args:
    hf_dir: Hugging Face checkpoint directory.
    config: the model to fill (usually `config_from_hf` of the same directory).
    on_tensor: called with each Hugging Face tensor name as it is read (progress).

  Raises:
    CheckpointError: missing, unexpected or wrongly shaped tensors, naming them.
  """
  reader = SafetensorsReader(hf_dir)
  available = {}
  for name in reader.names():
    available.setdefault(_canonical(name), name)
  expected = nn.unbox(abstract_params(config))
  flat = jax.tree_util.tree_flatten_with_path(expected)[0]
  dtype = np.dtype(config.param_dtype)
  used, leaves = set(), []
  for key_path, spec in flat:
    path = tuple(k.key for k in key_path)
    name = hf_name(path, config)
    if name not in available:
      raise CheckpointError(
          f'Tensor {name} (for {"/".join(path)}) is missing from {hf_dir}.')
    hf_shape, transform = to_ours(path, tuple(spec.shape))
    source = available[name]
    if reader.shape(source) != tuple(hf_shape):
      raise CheckpointError(
          f'Tensor {source} has shape {reader.shape(source)}, expected {tuple(hf_shape)} '
          f'(for {"/".join(path)} of shape {tuple(spec.shape)}).')
    if on_tensor is not None:
      on_tensor(source)
    array = transform(reader.get(source))
    leaves.append(array if array.dtype == dtype else array.astype(dtype))
    used.add(name)
  unexpected = [available[n] for n in sorted(set(available) - used)
                if not _IGNORED.search(available[n])
                and not (n == 'lm_head.weight' and config.tie_embeddings)]
  if unexpected:
    shown = ', '.join(unexpected[:5]) + (' ...' if len(unexpected) > 5 else '')
    raise CheckpointError(
        f'{hf_dir} has {len(unexpected)} tensor(s) with no place in the model: {shown}')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)


def convert_hf_checkpoint(hf_dir: str, output_dir: str, dtype: str | None = None,
                          expected: TransformerConfig | None = None,
                          log: Callable[[str], None] = print) -> TransformerConfig:
  """Converts a Hugging Face checkpoint directory into a calm_jax LM checkpoint.

  Args:
    hf_dir: local directory with `config.json` and `model.safetensors` (or shards + index).
    output_dir: where to write the LM checkpoint (local or `gs://`); must not exist yet.
    dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default: the checkpoint's.
    expected: if given, the architecture the checkpoint must have (dtypes aside); checked
      before anything is read or written.
    log: progress sink.

  Returns:
    The `TransformerConfig` written with the checkpoint.
  """
  hf = read_hf_config(hf_dir)
  checkpoints.check_new_lm_dir(output_dir)
  config = config_from_hf(hf, dtype=dtype)
  check_expected(config, expected, hf_dir)
  log(f'{hf.get("model_type")}: {config.num_layers} layers, width {config.embed_dim}, '
      f'{config.num_heads}/{config.num_kv_heads} heads, vocab {config.vocab_size}, '
      f'{config.param_dtype}')
  params = load_hf_params(hf_dir, config)
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  log(f'read {count:,} parameters; writing {output_dir}')
  checkpoints.save_lm(output_dir, config, params,
                      metadata={'source': 'huggingface', 'model_type': hf.get('model_type'),
                                'hf_dir': os.path.abspath(hf_dir)})
  return config
