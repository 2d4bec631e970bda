"""Runs composition train steps on several meshes of emulated CPU devices; prints JSON.

Run as a subprocess by tests/test_partitioning.py (the device count is fixed when JAX starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py
For each mesh (replica, data, model) and rule set: the losses of a few steps, the largest
parameter difference from the single-device run, and the sharding of every parameter; and
XLA's per-device FLOPs of a wider composition's step with and without activation constraints.
"""

import json
import sys

import flax.linen as nn
import jax
import numpy as np

from calm_jax import calm as calm_lib
from calm_jax import flops, optim, partitioning
from calm_jax.calm import Calm
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.train_step import (apply_fn_for, init_train_state, lower_composition_step,
                                 make_train_step, state_shardings)

VOCAB = 64
ANCHOR = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=64,
                           attention_types=('local', 'global'), sliding_window=4)
AUGMENT = TransformerConfig(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2,
                            num_kv_heads=2, head_dim=8, mlp_dim=32)
CONFIG = CalmConfig(anchor=ANCHOR, augments={'augment': AUGMENT},
                    bridges={'augment': BridgeConfig(connections=((1, 1), (2, 2)),
                                                     num_kv_heads=2, zero_init_out=False)})
STEPS = 3
BATCH, LENGTH = 8, 12
MESHES = [((1, 8, 1), False), ((1, 4, 2), False), ((1, 2, 4), False), ((1, 8, 1), True),
          ((2, 2, 2), True)]


def batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    tokens = rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    yield {'decoder_input_tokens': tokens, 'decoder_target_tokens': np.roll(tokens, -1, 1),
           'decoder_loss_weights': np.ones((BATCH, LENGTH), np.float32)}


def run(mesh_shape=None, fsdp=False):
  """(losses, final trained params as numpy, shardings listing or None)."""
  abstract = calm_lib.abstract_params(CONFIG)
  unboxed = nn.unbox(abstract)
  frozen = random_like({'anchor': unboxed['anchor'], 'augments': unboxed['augments']}, 0)
  trained = calm_lib.init_bridge_params(CONFIG, jax.random.key(0))
  optimizer, _ = optim.make_optimizer(name='adamw', learning_rate=1e-2, total_steps=STEPS)
  if mesh_shape is None:
    step_fn = make_train_step(apply_fn_for(Calm(CONFIG)), optimizer)
    state = init_train_state(trained, optimizer)
    put = lambda b: b  # pylint: disable=unnecessary-lambda-assignment
  else:
    replica, data, model = mesh_shape
    config = partitioning.MeshConfig(replica=replica, data=data, model=model, fsdp=fsdp)
    mesh = partitioning.make_mesh(config)
    rules = config.rules()
    step_fn = make_train_step(apply_fn_for(Calm(CONFIG)), optimizer, mesh=mesh, rules=rules)
    shardings = partitioning.param_shardings(abstract, mesh, rules)
    frozen = jax.device_put(frozen, {'anchor': shardings['anchor'],
                                     'augments': shardings['augments']})
    trained = jax.device_put(trained, {'bridge': shardings['bridge']})
    # The optimizer state is created already sharded.
    state = jax.jit(lambda s: s, out_shardings=state_shardings(
        optimizer, {'bridge': abstract['bridge']}, {'bridge': shardings['bridge']}, mesh))(
            init_train_state(trained, optimizer))
    put = lambda b: partitioning.global_batch(b, mesh, rules)  # pylint: disable=unnecessary-lambda-assignment
  losses, listing = [], None
  for batch in batches():
    state, metrics = step_fn(state, frozen, put(batch))
    losses.append(float(metrics['loss']))
  if mesh_shape is not None:
    # The shardings the arrays actually have after the steps.
    listing = partitioning.sharding_listing(jax.tree.map(
        lambda x: x.sharding, {**frozen, 'bridge': state.params['bridge']}))
  return losses, jax.tree.map(np.asarray, state.params), listing


# Wide enough that where XLA puts the activations shows in its FLOP count.
WIDE = CalmConfig(
    anchor=TransformerConfig(vocab_size=256, embed_dim=256, num_layers=4, num_heads=4,
                             num_kv_heads=4, head_dim=64, mlp_dim=1024),
    augments={'augment': TransformerConfig(vocab_size=256, embed_dim=128, num_layers=4,
                                           num_heads=2, num_kv_heads=2, head_dim=64,
                                           mlp_dim=512)},
    bridges={'augment': BridgeConfig(connections=((2, 2), (4, 4)))})
WIDE_BATCH, WIDE_LENGTH = 8, 128


def compiled_flops(fsdp, constrain):
  """XLA's per-device FLOPs of the WIDE composition step on a (1, 8, 1) mesh (compiled only).

  `constrain=False` traces the step outside `partitioning.activation_context`, as calm-train did
  before it applied the model's activation constraints.
  """
  config = partitioning.MeshConfig(data=8, fsdp=fsdp)
  optimizer, _ = optim.make_optimizer(name='adamw')
  lowered, _ = lower_composition_step(WIDE, partitioning.make_mesh(config), config.rules(),
                                      optimizer, WIDE_BATCH, WIDE_LENGTH,
                                      constrain_activations=constrain)
  analysis = lowered.compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def main():
  assert jax.device_count() == 8, jax.device_count()
  reference_losses, reference, _ = run()
  report = {'reference_losses': reference_losses, 'meshes': {}}
  for shape, fsdp in MESHES:
    losses, params, listing = run(shape, fsdp)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
    name = f'{"fsdp" if fsdp else "standard"}:{"x".join(map(str, shape))}'
    report['meshes'][name] = {'losses': losses, 'max_param_diff': diff, 'shardings': listing}
  report['wide'] = {
      'model_flops_per_device': flops.composition_step_flops(WIDE, WIDE_BATCH, WIDE_LENGTH) / 8,
      'xla_flops_per_device': {
          'standard': compiled_flops(fsdp=False, constrain=True),
          'fsdp': compiled_flops(fsdp=True, constrain=True),
          'fsdp_unconstrained': compiled_flops(fsdp=True, constrain=False)}}
  json.dump(report, sys.stdout, indent=1)


if __name__ == '__main__':
  main()
