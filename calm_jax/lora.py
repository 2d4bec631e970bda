"""LoRA: low-rank adapters on a frozen LM's projections (the paper's Table 5 baseline).

A projection `y = x W` (W of any einsum shape, input dims first) becomes
`y = x W + (alpha / rank) * (x A) B` with A [in..., r] and B [r, out...]. B starts at zero, so
an adapted model starts as exactly the model. The adapters are parameters beside the kernel
they adapt, named after it (`layer_3/attn/query_lora_a`, `layer_3/mlp/down_lora_b`), so that
the trainable set is chosen by path like every other (`TRAINABLE`): `calm-train` in 'lora' mode
trains `ADAPTER_PATTERNS` and nothing else, the base weights being frozen inputs of the step.
`merge_adapters` folds trained adapters into the kernels (`W + (alpha / r) A B`): the run's
exported LM is a plain checkpoint of the base architecture.

`rank_for_budget` picks the rank whose adapter count is nearest a parameter budget (the
paper's rule: as many trained parameters as the composition's bridges).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from calm_jax.configs import TransformerConfig

Array = jax.Array
TARGETS = ('query', 'key', 'value', 'out', 'gating', 'up', 'down')
ADAPTER_PATTERNS = (r'_lora_a$', r'_lora_b$')


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get adapters, of which rank.

  Attributes:
    rank: r, the adapters' inner width.
    alpha: the update is scaled by alpha / r; None: alpha = r (scale 1).
    targets: projection names among TARGETS (attention 'query', 'key', 'value', 'out'; MLP
      'gating', 'up', 'down').
  """

  rank: int
  alpha: float | None = None
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f'LoRAConfig.rank must be a positive int, got {self.rank!r}.')
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown or not self.targets:
      raise ValueError(f'LoRAConfig.targets: unknown {unknown} or none; choose from {TARGETS}.')

  @property
  def scale(self) -> float:
    """alpha / rank."""
    return (self.rank if self.alpha is None else self.alpha) / self.rank


def delta(module: nn.Module, name: str, x: Array, in_shape: Sequence[int],
          out_shape: Sequence[int], in_axes: Sequence[str | None],
          out_axes: Sequence[str | None], rank: int, scale: float, dtype: Any,
          param_dtype: Any) -> Array:
  """`scale * (x A) B` of projection `name` of `module`, creating `{name}_lora_a` [in..., r]
  and `{name}_lora_b` [r, out...] (zeros) there.

  Args:
    x: [..., in...], the projection's input (its last len(in_shape) dims contracted).
  """
  fan_in = math.prod(in_shape)
  a = module.param(f'{name}_lora_a', nn.with_logical_partitioning(
      nn.initializers.normal(fan_in ** -0.5), (*in_axes, None)), (*in_shape, rank), param_dtype)
  b = module.param(f'{name}_lora_b', nn.with_logical_partitioning(
      nn.initializers.zeros, (None, *out_axes)), (rank, *out_shape), param_dtype)
  n_in = len(in_shape)
  # [..., r]
  h = jax.lax.dot_general(x, a.astype(dtype), (((tuple(range(x.ndim - n_in, x.ndim))),
                                                 tuple(range(n_in))), ((), ())))
  # [..., out...]
  y = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
  return y * jnp.asarray(scale, dtype)


def adapter_count(config: TransformerConfig, lora: LoRAConfig) -> int:
  """The number of adapter parameters of `config` with `lora`."""
  d, f = config.embed_dim, config.mlp_dim
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  sizes = {'query': d + q, 'key': d + kv, 'value': d + kv, 'out': q + d, 'up': d + f,
           'gating': (d + f) if config.gated_mlp else 0, 'down': f + d}
  return config.num_layers * lora.rank * sum(sizes[t] for t in lora.targets)


def rank_for_budget(config: TransformerConfig, budget: int,
                    targets: Sequence[str] = TARGETS) -> int:
  """The rank (>= 1) whose adapter count is nearest `budget` parameters: within half a rank
  step of it (one step = `adapter_count` at rank 1) unless rank 1 is already above it."""
  step = adapter_count(config, LoRAConfig(1, targets=tuple(targets)))
  return max(1, round(budget / step))


def merge_adapters(params: Any, lora: LoRAConfig) -> dict:
  """`params` with every adapter pair folded into its kernel (`W + scale * A B`) and removed:
  a tree of the base architecture."""
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)), sep='/')
  out = {k: v for k, v in flat.items() if not k.endswith(('_lora_a', '_lora_b'))}
  for key in [k for k in flat if k.endswith('_lora_a')]:
    kernel_key = key[:-len('_lora_a')]
    a, b, w = flat[key], flat[kernel_key + '_lora_b'], flat[kernel_key]
    update = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    out[kernel_key] = (w.astype(jnp.float32) + lora.scale * update).astype(w.dtype)
  return traverse_util.unflatten_dict(out, sep='/')


def init_adapters(abstract: Any, key: jax.Array) -> dict:
  """Adapter leaves of an abstract LoRA tree (`jax.eval_shape` of its init): A normal with
  standard deviation fan_in ** -0.5, B zeros; nothing else is created."""
  flat = traverse_util.flatten_dict(nn.unbox(dict(abstract)), sep='/')
  out = {}
  for i, (k, leaf) in enumerate(sorted(flat.items())):
    if k.endswith('_lora_a'):
      fan_in = math.prod(leaf.shape[:-1])
      out[k] = (jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
                * fan_in ** -0.5).astype(leaf.dtype)
    elif k.endswith('_lora_b'):
      out[k] = jnp.zeros(leaf.shape, leaf.dtype)
  return traverse_util.unflatten_dict(out, sep='/')
