"""Logical axis rules, and sharded composition training == one device (8 emulated devices)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import partitioning
from calm_jax.partitioning import MeshConfig, PartitionSpec, logical_to_spec

GOLDEN = 'tests/golden/shardings.json'


class _FakeMesh:
  """Just the axis sizes, enough for logical_to_spec."""

  def __init__(self, **shape):
    self.shape = shape


def test_rules_map_t5x_names_and_fall_back_where_a_dimension_does_not_divide():
  mesh = _FakeMesh(replica=1, data=4, model=2)
  rules = partitioning.STANDARD_RULES
  assert logical_to_spec(('embed', 'heads', 'kv'), rules, mesh, (32, 4, 8)) == PartitionSpec(
      None, 'model', None)
  assert logical_to_spec(('heads', 'kv', 'embed'), rules, mesh, (3, 8, 32)) == PartitionSpec(
      None, None, None)  # 3 heads over 2 devices: replicated.
  fsdp = partitioning.FSDP_RULES
  assert logical_to_spec(('embed', 'mlp'), fsdp, mesh, (32, 64)) == PartitionSpec('data', 'model')
  assert logical_to_spec(('augment_embed', 'embed'), fsdp, mesh, (16, 32)) == PartitionSpec(
      'data', None)  # `data` is taken by the first dimension.
  # Activations: the batch claims `data` first, so the width stays whole.
  assert logical_to_spec(('batch', 'length', 'embed'), fsdp) == PartitionSpec(
      ('replica', 'data'), None, None)


def test_unknown_logical_name_is_an_error():
  with pytest.raises(ValueError, match="Unknown logical axis name 'experts'"):
    logical_to_spec(('embed', 'experts'), partitioning.STANDARD_RULES)


def test_mesh_shapes():
  assert MeshConfig(model=2).shape(8) == (1, 4, 2)
  assert MeshConfig(replica=2, data=2, model=2).shape(8) == (2, 2, 2)
  with pytest.raises(ValueError, match='does not fit 8 devices'):
    MeshConfig(data=3, model=2).shape(8)
  mesh = partitioning.make_mesh(MeshConfig(), jax.devices()[:1])
  assert mesh.axis_names == partitioning.MESH_AXES and mesh.devices.shape == (1, 1, 1)


@pytest.fixture(scope='module')
def sharded_report(repo_root):
  env = dict(os.environ, PYTHONPATH=str(repo_root),
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_backend_optimization_level=0')
  result = subprocess.run([sys.executable, str(repo_root / 'tests' / 'sharded_steps.py')],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


@pytest.mark.slow
def test_sharded_steps_equal_one_device(sharded_report):
  reference = sharded_report['reference_losses']
  assert len(sharded_report['meshes']) == 5
  for name, row in sharded_report['meshes'].items():
    np.testing.assert_allclose(row['losses'], reference, rtol=0, atol=1e-5, err_msg=name)
    assert row['max_param_diff'] <= 1e-5, name


@pytest.mark.slow
def test_actual_shardings_match_the_golden_listing(sharded_report, repo_root):
  golden = json.loads((repo_root / GOLDEN).read_text())
  actual = {name: row['shardings'] for name, row in sharded_report['meshes'].items()}
  assert actual == golden


@pytest.mark.slow
def test_activation_constraints_keep_fsdp_flops_at_the_model_flops(sharded_report):
  """With FSDP rules the step's activations stay batch-sharded (constraints applied).

  Left to itself XLA shards some activations along the width the parameters are sharded on and
  recomputes or re-gathers them: more FLOPs per device than the model needs.
  """
  wide = sharded_report['wide']
  model = wide['model_flops_per_device']
  xla = wide['xla_flops_per_device']
  # XLA counts a little more than the analytic model FLOPs (softmax, norms, the optimizer).
  assert 1.0 <= xla['standard'] / model < 1.05, xla
  assert 1.0 <= xla['fsdp'] / model < 1.05, xla
  # The comparison that shows the constraints matter on this model.
  assert xla['fsdp_unconstrained'] > 1.1 * xla['fsdp'], xla
