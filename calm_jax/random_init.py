"""Random parameters from shapes alone, with numpy: for benchmarks and tests.

`Module.init` compiles the whole forward pass plus one RNG program per parameter, which takes
tens of seconds on a CPU for models this project composes. Frozen models come from checkpoints
in real runs; benchmarks and tests only need plausible random weights of the right shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np


def random_like(abstract: Any, seed: int = 0, scale_names: tuple[str, ...] = ('scale',),
                plus_one: bool = False) -> Any:
  """Random arrays for an abstract (`jax.eval_shape`) parameter tree.

  Kernels get N(0, 1 / fan_in) with fan_in the first axis (all our kernels are [in, ...]);
  embeddings N(0, 1); norm scales 1 + U(-0.2, 0.2) (or U(-0.2, 0.2) if `plus_one`); biases
  N(0, 0.02).

  Args:
    abstract: tree of ShapeDtypeStruct (boxed or not).
    seed: numpy seed.
    scale_names: leaf names treated as norm scales.
    plus_one: norms scale by `1 + w` (Gemma), so their weights centre on 0.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    shape, dtype = leaf.shape, leaf.dtype
    if name in scale_names:
      value = rng.uniform(-0.2, 0.2, shape) + (0.0 if plus_one else 1.0)
    elif name.endswith('embedding'):
      value = rng.standard_normal(shape)
    elif name.endswith('_bias'):
      value = 0.02 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    return np.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(make, nn.unbox(abstract))


def random_lm_checkpoint(config: Any, directory: Any, seed: int) -> str:
  """Writes an untrained LM checkpoint of `config` (flax's own initialisers) to `directory`
  unless one is there already (the random-augment ablations); returns its path."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from calm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from calm_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
  directory = epath.Path(directory)
  if not (directory / checkpoints.CONFIG_FILE).exists():
    params = jax.jit(Transformer(config).init)(jax.random.key(seed),
                                               jnp.zeros((1, 1), jnp.int32))['params']
    checkpoints.save_lm(directory, config, jax.device_get(nn.unbox(params)),
                        metadata={'source': 'random init', 'seed': seed})
  return str(directory)
