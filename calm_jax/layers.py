"""Building blocks of the decoder: RMSNorm, embedder, gated MLP, rotary embeddings.

Einsum letters: B batch, T length, D width, F mlp hidden, V vocab, N heads, H head dim.
Every parameter carries logical axis names; `calm_jax.partitioning` maps them to the mesh.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import lora
from calm_jax.configs import RopeScaling

Array = jax.Array


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in (at least) float32.

  Attributes:
    eps: added to the mean square.
    plus_one: scale by `1 + w` (Gemma, weights initialised at 0) instead of `w` (init 1).
    axis_name: logical axis name of the scale vector.
    param_dtype: storage dtype of the scale.
  """

  eps: float = 1e-6
  plus_one: bool = False
  axis_name: str = 'embed'
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = _param(self, 'scale', init, (x.shape[-1],), (self.axis_name,), self.param_dtype)
    wide = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(wide)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(wide)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


class Embedder(nn.Module):
  """Token embedding table, also used as the output projection when tied.

  Attributes:
    vocab_size: V.
    embed_dim: D.
    tie: if False, a separate `output_embedding` [V, D] produces the logits.
    scale: multiply embeddings by `sqrt(D)` (Gemma), rounded to the compute dtype.
    init_scale: initial standard deviation, times 1 / sqrt(D).
    dtype: compute dtype.
    param_dtype: storage dtype.
  """

  vocab_size: int
  embed_dim: int
  tie: bool = True
  scale: bool = False
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    # 1/sqrt(D) keeps tied logits O(1) at initialisation (the input side is normed anyway).
    init = nn.initializers.normal(stddev=self.init_scale * self.embed_dim ** -0.5)
    shape = (self.vocab_size, self.embed_dim)
    self.input_embedding = _param(self, 'input_embedding', init, shape, ('vocab', 'embed'),
                                  self.param_dtype)
    if not self.tie:
      init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.embed_dim))
      self.output_embedding = _param(self, 'output_embedding', init, shape, ('vocab', 'embed'),
                                     self.param_dtype)

  def encode(self, tokens: Array) -> Array:
    """Embeds `tokens` [B, T] into [B, T, D]."""
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    if self.scale:
      x = x * jnp.asarray(math.sqrt(self.embed_dim), self.dtype)
    return x

  def decode(self, x: Array) -> Array:
    """Projects [B, T, D] to logits [B, T, V]."""
    table = self.input_embedding if self.tie else self.output_embedding
    # [B, T, V]
    return dense('BTD,VD->BTV', x, table.astype(self.dtype))


def dense(spec: str, x: Array, kernel: Array) -> Array:
  """`jnp.einsum(spec, x, kernel)` of a projection whose first two dims (batch, length) `x` and
  the output share, computed over `x` flattened to [B * T, ...].

  The same product; but its gradient with respect to the kernel then contracts one dimension
  instead of two, which XLA:CPU runs as one matrix product instead of transposing copies and a
  slower dot (an MLP's forward + backward 1.7x faster on one core; `benchmarks/vs_torch.py`).

  Args:
    spec: e.g. 'BTD,DNH->BTNH': two leading letters on `x` and the output, none on the kernel.
    x: [B, T, ...].
    kernel: the weights.
  """
  inputs, out = spec.split('->')
  lhs, rhs = inputs.split(',')
  lead = lhs[:2]
  if not out.startswith(lead) or set(lead) & set(rhs) or 'X' in spec:
    raise ValueError(f'dense takes a projection of [B, T, ...] inputs, not {spec!r}.')
  y = jnp.einsum(f'X{lhs[2:]},{rhs}->X{out[2:]}', x.reshape((-1,) + x.shape[2:]), kernel)
  return y.reshape(x.shape[:2] + y.shape[1:])


def activation_fn(name: str):
  """Returns the activation function called `name` (see `configs.ACTIVATIONS`)."""
  if name == 'silu':
    return jax.nn.silu
  if name == 'gelu_tanh':
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f'Unknown activation {name!r}.')


class MLP(nn.Module):
  """Feed-forward block: `down(act(x W_gate) * (x W_up))` (or `down(act(x W_up))` ungated).

  Attributes:
    embed_dim: D.
    mlp_dim: F.
    activation: a name from `configs.ACTIVATIONS`.
    gated: use the gating branch.
    dtype: compute dtype.
    param_dtype: storage dtype.
    lora_rank: rank of LoRA adapters on the `lora_targets` projections (0: none).
    lora_scale: the adapters' alpha / rank.
    lora_targets: of 'gating', 'up', 'down'.
  """

  embed_dim: int
  mlp_dim: int
  activation: str = 'silu'
  gated: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0
  lora_scale: float = 1.0
  lora_targets: tuple[str, ...] = ()

  def _project(self, name: str, x: Array, kernel: Array, axes: tuple[str, str]) -> Array:
    # [B, T, out]
    y = dense('BTI,IO->BTO', x, kernel.astype(self.dtype))
    if self.lora_rank and name in self.lora_targets:
      y = y + lora.delta(self, name, x, kernel.shape[:1], kernel.shape[1:], axes[:1], axes[1:],
                         self.lora_rank, self.lora_scale, self.dtype, self.param_dtype)
    return y

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.lecun_normal()
    d, f = self.embed_dim, self.mlp_dim
    up = _param(self, 'up', init, (d, f), ('embed', 'mlp'), self.param_dtype)
    down = _param(self, 'down', init, (f, d), ('mlp', 'embed'), self.param_dtype)
    act = activation_fn(self.activation)
    # [B, T, F]
    h = self._project('up', x, up, ('embed', 'mlp'))
    if self.gated:
      gating = _param(self, 'gating', init, (d, f), ('embed', 'mlp'), self.param_dtype)
      # [B, T, F]
      h = act(self._project('gating', x, gating, ('embed', 'mlp'))) * h
    else:
      h = act(h)
    # [B, T, D]
    return self._project('down', h, down, ('mlp', 'embed'))


def rope_inverse_frequencies(head_dim: int, base: float,
                             scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies [H // 2] of rotary embeddings, with optional long-context scaling."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = 1.0 / (np.float32(base) ** exponents)
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.kind == 'linear':
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # Llama 3: keep high frequencies, divide low ones by `factor`, blend linearly in between.
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor) /
            (scaling.high_freq_factor - scaling.low_freq_factor))
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates `x` [B, T, N, H] by `positions` [B, T] (halves layout: (x1, x2) -> rotated).

  The checkpoint importers keep Hugging Face's query/key row order, whose rotary pairs are
  (i, i + H/2), so this is the matching layout.
  """
  # [B, T, H/2]
  wide = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions.astype(wide)[..., None] * jnp.asarray(inv_freq, wide)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(wide), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
