"""Import of GGUF files (llama.cpp's format) into calm_jax LM checkpoints.

A GGUF file holds the architecture as metadata (`gemma3.block_count`, ...), the weights as
(possibly quantised) tensors under llama.cpp's names (`blk.0.attn_q.weight`), and the tokenizer
(pieces, scores, types). This module reads all three:

- the metadata becomes the Hugging Face `config.json` of the same model (`hf_config_of`), so that
  one translation (`hf_config.config_from_hf`) serves both importers;
- each tensor is dequantised by the `gguf` package (`gguf.quants.dequantize`), one at a time,
  undoing llama.cpp's conventions on the way: the llama family's q/k rows are permuted for
  llama.cpp's interleaved RoPE (we use the halves layout of Hugging Face), and Gemma's norm weights
  are stored as `1 + w` (llama.cpp's RMSNorm multiplies by the weight; Gemma's by `1 + w`);
- the tokenizer (`vocab.tokenizer_from_gguf`: SentencePiece, or byte-level BPE for Qwen and
  Llama 3) is saved beside the checkpoint, where it loads as a SeqIO vocabulary.

The file is memory-mapped: the only full copy of the weights in host memory is the converted tree.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from calm_jax import checkpoints
from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import TransformerConfig
from calm_jax.convert import huggingface
from calm_jax.convert.hf_config import UnsupportedModelError, config_from_hf
from calm_jax.transformer import abstract_params

ARCHITECTURES = ('llama', 'qwen2', 'qwen3', 'gemma2', 'gemma3')
# llama.cpp stores these families' norm weights as 1 + w (Gemma's RMSNorm scales by 1 + w).
_PLUS_ONE_NORMS = ('gemma2', 'gemma3')
# llama.cpp permutes q/k rows for its interleaved RoPE in these families only.
_PERMUTED_QK = ('llama',)
# Tensor types `gguf.quants.dequantize` reads and that we accept (what llama.cpp's common
# quantisations produce); others are refused by name before anything is read.
QUANT_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K',
               'Q4_K', 'Q5_K', 'Q6_K')
# Layer counts of the 27B models, whose query scale is 1/sqrt(hidden / heads), not 1/sqrt(head
# dim) (llama.cpp decides it by model size; the metadata does not state it).
_GEMMA_27B_LAYERS = {'gemma2': 46, 'gemma3': 62}
# Gemma 3's sliding-window layer pattern and local RoPE base (llama.cpp's constants).
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0

_LAYER_NAMES = {
    ('pre_attention_norm', 'scale'): 'attn_norm.weight',
    ('post_attention_norm', 'scale'): 'post_attention_norm.weight',
    ('pre_ffw_norm', 'scale'): 'ffn_norm.weight',
    ('post_ffw_norm', 'scale'): 'post_ffw_norm.weight',
    ('attn', 'query'): 'attn_q.weight',
    ('attn', 'key'): 'attn_k.weight',
    ('attn', 'value'): 'attn_v.weight',
    ('attn', 'out'): 'attn_output.weight',
    ('attn', 'query_bias'): 'attn_q.bias',
    ('attn', 'key_bias'): 'attn_k.bias',
    ('attn', 'value_bias'): 'attn_v.bias',
    ('attn', 'out_bias'): 'attn_output.bias',
    ('attn', 'query_norm', 'scale'): 'attn_q_norm.weight',
    ('attn', 'key_norm', 'scale'): 'attn_k_norm.weight',
    ('mlp', 'gating'): 'ffn_gate.weight',
    ('mlp', 'up'): 'ffn_up.weight',
    ('mlp', 'down'): 'ffn_down.weight',
}
# Tensors a GGUF may carry that have no parameter here (llama.cpp's precomputed RoPE factors are
# refused separately: they mean a RoPE scaling the metadata does not describe).
_IGNORED = re.compile(r'^rope_(cos|sin)\b')


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError('Reading GGUF files needs the `gguf` package (a dependency of '
                          'calm_jax): pip install gguf.') from e
  return gguf


class GGUFFile:
  """A GGUF file opened for reading (memory-mapped), with clear errors for bad files.

  Attributes:
    path: the file.
    architecture: `general.architecture` (e.g. 'gemma3').
    tensors: {name: gguf ReaderTensor}.
  """

  def __init__(self, path: str | os.PathLike[str]):
    gguf = _gguf()
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise CheckpointError(f'GGUF file {self.path} does not exist.')
    try:
      self._reader = gguf.GGUFReader(self.path)
    except Exception as e:  # The reader raises ValueError, IndexError, struct errors...
      raise CheckpointError(f'{self.path} is not a readable GGUF file (truncated or corrupt?): '
                            f'{type(e).__name__}: {e}') from e
    self.tensors = {t.name: t for t in self._reader.tensors}
    size = os.path.getsize(self.path)
    for t in self._reader.tensors:
      end = int(t.data_offset) + int(t.n_bytes)
      if end > size or t.data.nbytes != int(t.n_bytes):
        raise CheckpointError(f'{self.path} is truncated: tensor {t.name} needs bytes up to {end:,} '
                              f'but the file has {size:,}.')
    self.architecture = str(self.get('general.architecture', ''))

  def get(self, key: str, default: Any = None) -> Any:
    """The metadata value under `key` (str, number, bool or list), or `default`."""
    field = self._reader.fields.get(key)
    if field is None:
      return default
    return field.contents()

  def require(self, key: str) -> Any:
    """The metadata value under `key`; a CheckpointError naming it if absent."""
    value = self.get(key)
    if value is None:
      raise CheckpointError(f'{self.path} lacks metadata key {key!r}.')
    return value

  def tensor_type(self, name: str) -> str:
    """The GGML type name of tensor `name` ('Q4_K', 'F32', ...)."""
    return self.tensors[name].tensor_type.name

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` dequantised to float32 (or as stored, for float types), in the row-major
    shape of its PyTorch original ([out, in] for a projection)."""
    t = self.tensors[name]
    kind = t.tensor_type.name
    if kind not in QUANT_TYPES:
      raise UnsupportedModelError(f'Tensor {name} of {self.path} has type {kind}; supported: '
                                  f'{", ".join(QUANT_TYPES)}.')
    return _gguf().quants.dequantize(t.data, t.tensor_type)


def _decimal(value: Any) -> float | None:
  """A float32 metadata value as the decimal it was written from: the shortest decimal that
  rounds to the same float32 (1e-6 is stored as 9.99999997e-07; it reads back as 1e-6)."""
  return None if value is None else float(str(np.float32(value)))


def hf_config_of(f: GGUFFile) -> dict[str, Any]:
  """The Hugging Face `config.json` of the model in `f`, built from its metadata.

  Raises:
    UnsupportedModelError: an architecture outside `ARCHITECTURES` or an option (RoPE scaling
      from precomputed factors) not implemented.
    CheckpointError: a required metadata key is missing.
  """
  arch = f.architecture
  if arch not in ARCHITECTURES:
    raise UnsupportedModelError(f'Unsupported GGUF architecture {arch!r} in {f.path}; supported: '
                                f'{", ".join(ARCHITECTURES)}.')
  key = lambda name: f.require(f'{arch}.{name}')  # pylint: disable=unnecessary-lambda-assignment
  if 'token_embd.weight' not in f.tensors:
    raise CheckpointError(f'{f.path} has no token_embd.weight tensor.')
  if 'rope_freqs.weight' in f.tensors:
    raise UnsupportedModelError(
        f'{f.path} carries precomputed RoPE factors (rope_freqs.weight, e.g. Llama 3.1 scaling), '
        'which are not supported; convert the Hugging Face checkpoint with --hf_dir instead.')
  heads = int(key('attention.head_count'))
  hidden = int(key('embedding_length'))
  layers = int(key('block_count'))
  head_dim = int(f.get(f'{arch}.attention.key_length') or f.get(f'{arch}.rope.dimension_count')
                 or hidden // heads)
  hf = {
      'model_type': 'gemma3_text' if arch == 'gemma3' else arch,
      'vocab_size': int(f.tensors['token_embd.weight'].shape[-1]),
      'hidden_size': hidden,
      'num_hidden_layers': layers,
      'num_attention_heads': heads,
      'num_key_value_heads': int(f.get(f'{arch}.attention.head_count_kv') or heads),
      'head_dim': head_dim,
      'intermediate_size': int(key('feed_forward_length')),
      'rms_norm_eps': _decimal(key('attention.layer_norm_rms_epsilon')),
      'rope_theta': _decimal(f.get(f'{arch}.rope.freq_base', 10_000.0)),
      'max_position_embeddings': int(f.get(f'{arch}.context_length', 2048)),
      'tie_word_embeddings': 'output.weight' not in f.tensors,
      'dtype': 'float32',
  }
  scaling = f.get(f'{arch}.rope.scaling.type')
  if scaling not in (None, 'none'):
    if scaling != 'linear':
      raise UnsupportedModelError(f'Unsupported RoPE scaling {scaling!r} in {f.path}.')
    hf['rope_scaling'] = {'rope_type': 'linear',
                          'factor': _decimal(key('rope.scaling.factor'))}
  # Qwen2's q/k/v biases come with the family; `attention_bias` means every projection has one.
  if 'blk.0.attn_output.bias' in f.tensors:
    hf['attention_bias'] = True
  if arch in ('gemma2', 'gemma3'):
    hf['sliding_window'] = int(key('attention.sliding_window'))
    hf['query_pre_attn_scalar'] = (hidden // heads if layers == _GEMMA_27B_LAYERS[arch]
                                   else head_dim)
  if arch == 'gemma2':
    hf['attn_logit_softcapping'] = _decimal(f.get('gemma2.attn_logit_softcapping'))
    hf['final_logit_softcapping'] = _decimal(f.get('gemma2.final_logit_softcapping'))
  if arch == 'gemma3':
    hf['sliding_window_pattern'] = int(f.get('gemma3.attention.sliding_window_pattern',
                                             _GEMMA3_PATTERN))
    hf['rope_local_base_freq'] = _GEMMA3_LOCAL_ROPE_BASE
    hf['final_logit_softcapping'] = _decimal(f.get('gemma3.final_logit_softcapping'))
  return hf


def config_from_gguf(f: GGUFFile, dtype: str | None = None) -> TransformerConfig:
  """The `TransformerConfig` of the model in `f` (float32 unless `dtype`)."""
  return config_from_hf(hf_config_of(f), dtype=dtype or 'float32')


def gguf_name(path: tuple[str, ...]) -> str:
  """The GGUF tensor name of our parameter `path` (e.g. ('layer_0', 'mlp', 'up'))."""
  if path == ('embedder', 'input_embedding'):
    return 'token_embd.weight'
  if path == ('embedder', 'output_embedding'):
    return 'output.weight'
  if path == ('final_norm', 'scale'):
    return 'output_norm.weight'
  match = re.fullmatch(r'layer_(\d+)', path[0])
  if match is None or path[1:] not in _LAYER_NAMES:
    raise KeyError(f'No GGUF name for parameter {"/".join(path)}.')
  return f'blk.{match.group(1)}.{_LAYER_NAMES[path[1:]]}'


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (`permute` in convert_hf_to_gguf.py): within each
  head, rows stored as interleaved pairs (r0, r_half, r1, r_half+1, ...) go back to halves."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_params(f: GGUFFile, config: TransformerConfig,
                     on_tensor: Callable[[str], None] | None = None,
                     permute: Callable[[np.ndarray, int], np.ndarray] = unpermute_qk
                     ) -> dict[str, Any]:
  """Reads the weights of `f` into our parameter tree of jax arrays, one tensor at a time.

  Args:
    f: the opened file.
    config: the model to fill (`config_from_gguf(f)`).
    on_tensor: called with each GGUF tensor name as it is read (progress).
    permute: the inverse of llama.cpp's q/k permutation (replaceable for tests' controls).

  Raises:
    CheckpointError: missing, unexpected or wrongly shaped tensors, naming them.
    UnsupportedModelError: a tensor type outside `QUANT_TYPES`.
  """
  arch = f.architecture
  expected = nn.unbox(abstract_params(config))
  flat = jax.tree_util.tree_flatten_with_path(expected)[0]
  bad = sorted({f.tensor_type(n) for n in f.tensors} - set(QUANT_TYPES))
  if bad:
    raise UnsupportedModelError(f'{f.path} has tensors of unsupported type(s) {", ".join(bad)}; '
                                f'supported: {", ".join(QUANT_TYPES)}.')
  dtype = np.dtype(config.param_dtype)
  used, leaves = set(), []
  for key_path, spec in flat:
    path = tuple(k.key for k in key_path)
    name = gguf_name(path)
    if name not in f.tensors:
      raise CheckpointError(f'Tensor {name} (for {"/".join(path)}) is missing from {f.path}.')
    hf_shape, transform = huggingface.to_ours(path, tuple(spec.shape))
    if on_tensor is not None:
      on_tensor(name)
    w = f.array(name)
    if tuple(w.shape) != tuple(hf_shape):
      raise CheckpointError(
          f'Tensor {name} of {f.path} has shape {tuple(w.shape)}, expected {tuple(hf_shape)} '
          f'(for {"/".join(path)} of shape {tuple(spec.shape)}).')
    if arch in _PERMUTED_QK and path[-1] in ('query', 'key', 'query_bias', 'key_bias'):
      w = permute(w, config.num_heads if path[-1].startswith('query') else config.num_kv_heads)
    if arch in _PLUS_ONE_NORMS and name.endswith('norm.weight'):
      w = w - np.float32(1.0)
    array = np.asarray(transform(w))
    # Into an XLA buffer at once, the host copy dropped: orbax then saves from these buffers
    # with less staging than from numpy arrays (measured: 0.6 instead of 1.8 extra copies).
    leaves.append(jax.device_put(array if array.dtype == dtype else array.astype(dtype)))
    del w, array
    used.add(name)
  unexpected = sorted(n for n in set(f.tensors) - used
                      if not _IGNORED.search(n)
                      and not (n == 'output.weight' and config.tie_embeddings))
  if unexpected:
    shown = ', '.join(unexpected[:5]) + (' ...' if len(unexpected) > 5 else '')
    raise CheckpointError(
        f'{f.path} has {len(unexpected)} tensor(s) with no place in the model: {shown}')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)


def convert_gguf_file(gguf_file: str, output_dir: str, dtype: str | None = None,
                      expected: TransformerConfig | None = None, tokenizer: bool = True,
                      log: Callable[[str], None] = print) -> TransformerConfig:
  """Converts a GGUF file into a calm_jax LM checkpoint with its tokenizer as a vocabulary.

  Args:
    gguf_file: the local `.gguf` file.
    output_dir: where to write the LM checkpoint (local or `gs://`); must not exist yet.
    dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default float32 (the dequantised
      values are exact in float32).
    expected: if given, the architecture the file must hold (dtypes aside); checked before any
      tensor is read.
    tokenizer: also write the file's tokenizer (`vocab.model` or `vocab.bpe.json`; an error
      if it has none).
    log: progress sink.

  Returns:
    The `TransformerConfig` written with the checkpoint.
  """
  from calm_jax import vocab  # pylint: disable=g-import-not-at-top
  f = GGUFFile(gguf_file)
  checkpoints.check_new_lm_dir(output_dir)
  config = config_from_gguf(f, dtype=dtype)
  huggingface.check_expected(config, expected, gguf_file)
  # The tokenizer before the weights: a file without one fails before anything is written.
  gguf_tokenizer = vocab.tokenizer_from_gguf(f) if tokenizer else None
  kinds: dict[str, int] = {}
  for name in f.tensors:
    kinds[f.tensor_type(name)] = kinds.get(f.tensor_type(name), 0) + 1
  log(f'{f.architecture} ({f.get("general.name", "?")}): {config.num_layers} layers, width '
      f'{config.embed_dim}, {config.num_heads}/{config.num_kv_heads} heads, vocab '
      f'{config.vocab_size}; tensors {", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))}'
      f' -> {config.param_dtype}')
  params = load_gguf_params(f, config)
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  log(f'read {count:,} parameters; writing {output_dir}')
  checkpoints.save_lm(output_dir, config, params,
                      metadata={'source': 'gguf', 'architecture': f.architecture,
                                'name': f.get('general.name'),
                                'gguf_file': os.path.abspath(gguf_file)})
  del params
  if gguf_tokenizer is not None:
    path = vocab.save_vocabulary(output_dir, gguf_tokenizer)
    log(f'wrote the tokenizer ({gguf_tokenizer.size:,} tokens) to {path}')
  return config

