"""Sharded decoding on 8 emulated devices gives one device's tokens (tests/sharded_decode.py)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope='module')
def report(repo_root):
  env = dict(os.environ, PYTHONPATH=str(repo_root),
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_backend_optimization_level=0')
  result = subprocess.run([sys.executable, str(repo_root / 'tests' / 'sharded_decode.py')],
                          capture_output=True, text=True, timeout=900, env=env, check=False,
                          cwd=repo_root / 'tests')
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


@pytest.mark.slow
def test_every_mesh_decodes_the_single_device_tokens(report):
  # Greedy, sampled (same key) and beam-search tokens of a composition with two augments and a
  # window anchor layer, and of a Gemma-2-like LM; 8 ragged prompts.
  assert report['devices'] == 8
  assert set(report['meshes']) == {'1x8x1', '1x4x2', '1x2x4', '1x4x2 fsdp'}
  for mesh, row in report['meshes'].items():
    for key, tokens in report['reference'].items():
      assert row[key] == tokens, (mesh, key)


@pytest.mark.slow
def test_parameters_and_outputs_are_really_sharded(report):
  # With a model axis the heads, MLP and vocabulary are split (with FSDP the widths too); the
  # tokens come back split over the batch.
  rows = report['meshes']
  for mesh, row in rows.items():
    assert row['composition/output_spec'][0] == ['replica', 'data'], mesh
    assert all(axis is None for axis in row['composition/output_spec'][1:]), mesh
  assert rows['1x8x1']['composition/sharded_params'] == 0
  for mesh in ('1x4x2', '1x2x4'):
    assert rows[mesh]['composition/sharded_params'] > 0 and rows[mesh]['lm/sharded_params'] > 0
  assert rows['1x4x2 fsdp']['composition/sharded_params'] > rows['1x4x2'][
      'composition/sharded_params']


@pytest.mark.slow
def test_a_decoding_step_never_gathers_a_layers_cache(report):
  # The Gemma-like LM's 2 key/value heads do not divide a model axis of 4: its cache splits
  # the head dimension there, and the queries follow, so the step all-reduces scores instead
  # of gathering a layer's whole cache onto every device (what XLA does left to itself).
  for mesh, row in report['meshes'].items():
    assert row['lm/largest_gather'] < row['lm/cache_layer'] / 2, mesh
