"""Restores a composition run on a mesh of emulated CPU devices and exports it there; prints JSON.

Run as a subprocess by tests/test_infer.py (the device count is fixed when JAX starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_restore.py \
      RUN ONE_DEVICE_EXPORT OUT_DIR
RUN is a composition run directory and ONE_DEVICE_EXPORT its composed checkpoint exported on
one device with a serving artifact. On a data 4 x model 2 mesh this reports how the restored
parameters are laid out against the shardings the decoder uses, whether their values equal a
one-device restore, and the tokens of the mesh's serving artifact against the one-device one.
"""

import json
import sys

import jax
import numpy as np
from etils import epath

from calm_jax import checkpoints, composed, decoding, partitioning, runs
from calm_jax import export as export_lib
from calm_jax.calm import Calm

MESH = partitioning.MeshConfig(data=4, model=2)


def _layout(params, placement):
  """(leaves in the expected sharding, leaves not, leaves split over devices)."""
  flat, expected = checkpoints.flat_paths(params), checkpoints.flat_paths(placement)
  same = sum(1 for k, x in flat.items() if x.sharding.is_equivalent_to(expected[k], x.ndim))
  split = sum(1 for x in flat.values() if not x.sharding.is_fully_replicated)
  return same, len(flat) - same, split


def _equal_values(sharded, reference):
  """Whether every restored leaf equals the one-device restore's leaf at the same path."""
  ref = checkpoints.flat_paths(reference)
  return all(np.array_equal(np.asarray(x), np.asarray(ref[k]))
             for k, x in checkpoints.flat_paths(sharded).items())


def main(run, one_export, out_dir):
  mesh, rules = partitioning.make_mesh(MESH), MESH.rules()
  placement = decoding.mesh_placement(mesh, rules)
  report = {'devices': jax.device_count()}
  reference = runs.load_checkpoint(run)
  loaded = runs.load_checkpoint(run, shardings=placement)
  expected = placement(loaded.model)
  same, other, split = _layout(loaded.params, expected)
  report['run'] = {
      'in_place': same, 'elsewhere': other, 'split': split,
      'equal': _equal_values(loaded.params, reference.params),
      'paths': sorted(checkpoints.flat_paths(loaded.params)),
      'expected_paths': sorted(checkpoints.flat_paths(expected)),
      'reference_paths': sorted(checkpoints.flat_paths(reference.params))}
  anchor_dir = json.loads((epath.Path(run) / runs.CALM_RUN_FILE).read_text())[
      'anchor_checkpoint']
  lm = runs.load_checkpoint(anchor_dir, shardings=placement)
  same, other, split = _layout(lm.params, placement(lm.model))
  report['lm'] = {'in_place': same, 'elsewhere': other, 'split': split,
                  'equal': _equal_values(lm.params, runs.load_checkpoint(anchor_dir).params)}

  signature = json.loads((epath.Path(one_export) / composed.SERVING_DIR /
                          composed.SIGNATURE_FILE).read_text())
  prompt_length, new = signature['inputs']['input_tokens'][1], signature['max_decode_len']
  result = export_lib.export(checkpoint=run, output_dir=out_dir, mesh=MESH,
                             serving_prompt_length=prompt_length, max_decode_len=new,
                             log=lambda _: None)
  same, other, split = _layout(result.params, placement(Calm(result.config)))
  one = composed.load_composed(one_export)
  report['export'] = {'in_place': same, 'elsewhere': other, 'split': split,
                      'equal': _equal_values(result.params, one.params),
                      'signature': json.loads((epath.Path(out_dir) / composed.SERVING_DIR /
                                               composed.SIGNATURE_FILE).read_text())}
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, one.config.anchor.vocab_size, (8, prompt_length)).astype(np.int32)
  lengths = rng.integers(1, prompt_length + 1, 8)
  mask = (np.arange(prompt_length)[None] < lengths[:, None]).astype(np.int32)
  key = jax.random.key_data(jax.random.key(0))
  batch = partitioning.batch_sharding(mesh, rules)
  on_mesh = composed.load_serving(out_dir)(
      result.params, jax.device_put(tokens, batch), jax.device_put(mask, batch), key)
  on_one = composed.load_serving(one_export)(one.params, tokens, mask, key)
  report['serving'] = {'mesh': np.asarray(on_mesh).tolist(), 'one': np.asarray(on_one).tolist(),
                       'spec': [a if a is None or isinstance(a, str) else list(a)
                                for a in on_mesh.sharding.spec]}
  print(json.dumps(report))


if __name__ == '__main__':
  main(*sys.argv[1:4])
