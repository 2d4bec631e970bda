"""Sharded composition steps with an orbax save and restore, in one or several processes.

Run by tests/test_multiprocess.py, once as one process with 8 emulated CPU devices and once as
two processes with 4 each (`jax.distributed` over 127.0.0.1, gloo collectives):

  python tests/multiprocess_steps.py --num_processes=2 --process_id=0 --port=P --out=DIR

Every process builds the same global batches and feeds only its rows (JAX's
`make_array_from_process_local_data`); parameters and optimizer state are sharded on a
(replica, data, model) = (1, 4, 2) mesh with the FSDP rules. After two steps all processes save
(orbax), a fresh checkpointer restores into the sharded layout, and two more steps run.
Process 0 writes the losses and the final bridges (gathered) to DIR/result.npz.
"""

import argparse

import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{args.port}', num_processes=args.num_processes,
                               process_id=args.process_id)
  assert jax.device_count() == 8, jax.device_count()

  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  from jax.experimental import multihost_utils
  from calm_jax import calm as calm_lib
  from calm_jax import checkpoints, optim, partitioning
  from calm_jax.calm import Calm
  from calm_jax.random_init import random_like
  from calm_jax.train_step import init_train_state, make_sharded_train_step, state_shardings
  from sharded_steps import BATCH, CONFIG, batches

  config = partitioning.MeshConfig(data=4, model=2, fsdp=True)
  mesh = partitioning.make_mesh(config)
  rules = config.rules()
  abstract = calm_lib.abstract_params(CONFIG)
  shardings = partitioning.param_shardings(abstract, mesh, rules)
  unboxed = nn.unbox(abstract)
  host_frozen = random_like({'anchor': unboxed['anchor'], 'augments': unboxed['augments']}, 0)
  frozen = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host_frozen, {'anchor': shardings['anchor'], 'augments': shardings['augments']})
  optimizer, _ = optim.make_optimizer(name='adamw', learning_rate=1e-2, total_steps=4)
  trained_shardings = {'bridge': shardings['bridge']}
  train_state_shardings = state_shardings(optimizer, {'bridge': abstract['bridge']},
                                          trained_shardings, mesh)
  state = jax.jit(lambda key: init_train_state(calm_lib.init_bridge_params(CONFIG, key),
                                               optimizer),
                  out_shardings=train_state_shardings)(jax.random.key(0))
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = make_sharded_train_step(
      Calm(CONFIG), optimizer, 0.0, mesh=mesh, rules=rules,
      train_state_shardings=train_state_shardings, frozen_shardings=frozen_shardings)
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  all_batches = list(batches()) + list(batches())[:1]  # 4 steps.
  losses = []
  for i, batch in enumerate(all_batches):
    if i == 2:
      checkpointer = checkpoints.RunCheckpointer(f'{args.out}/run')
      checkpointer.save(2, state, batches_consumed=2)
      checkpointer.close()
      abstract_state = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
      del state
      restorer = checkpoints.RunCheckpointer(f'{args.out}/run')
      state, consumed = restorer.restore(restorer.latest_step(), abstract_state)
      restorer.close()
      assert consumed == 2
    local = {k: v[mine] for k, v in batch.items()}
    state, metrics = step_fn(state, frozen, partitioning.global_batch(local, mesh, rules))
    losses.append(float(np.asarray(metrics['loss'].addressable_data(0))))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if jax.process_index() == 0:
    np.savez(f'{args.out}/result.npz', losses=np.asarray(losses), **flat)


if __name__ == '__main__':
  main()
