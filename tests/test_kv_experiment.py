"""The main job at its small setting: the whole pipeline, and CALM beats both models."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_small_pipeline_end_to_end(tmp_path):
  out = tmp_path / 'kv'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.kv_experiment',
       '--gin_file=experiments/kv_arithmetic_small.gin', f"--gin.EXPERIMENT_DIR='{out}'"],
      capture_output=True, text=True, timeout=1800, env=env, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ('results.json', 'results.md', 'results.png', 'config.gin'):
    assert (out / name).exists(), name
  accuracy = json.loads((out / 'results.json').read_text())['accuracy']
  kv = accuracy['kv_arithmetic']  # Held-out keys only.
  assert kv['calm'] >= max(kv['m_A'], kv['m_B']) + 20, accuracy
  assert kv['calm'] >= kv['calm_random_m_A'] + 20, accuracy
  assert accuracy['kv_substitution']['m_A'] >= 50, accuracy
  assert accuracy['numeric_arithmetic']['m_B'] >= 50, accuracy
  table = (out / 'results.md').read_text()
  assert '84.3' in table and 'KV-Arithmetic' in table
