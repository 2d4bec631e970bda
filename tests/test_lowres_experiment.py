"""The low-resource-language experiment at its small setting: every phase and every cell."""

import json
import math
import os
import subprocess
import sys

import pytest

from calm_tasks import lowres_experiment


@pytest.mark.slow
def test_small_pipeline_end_to_end(tmp_path):
  out = tmp_path / 'lowres'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.lowres_experiment',
       '--gin_file=experiments/lowres_bible_small.gin', f"--gin.EXPERIMENT_DIR='{out}'"],
      capture_output=True, text=True, timeout=1800, env=env, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ('results.json', 'results.md', 'results.png', 'config.gin', 'vocab.model'):
    assert (out / name).exists(), name
  record = json.loads((out / 'results.json').read_text())
  results, settings = record['results'], record['settings']
  for metric in lowres_experiment.METRICS:
    assert set(results[metric]) == set(lowres_experiment.MODELS), metric
    assert all(math.isfinite(v) for v in results[metric].values()), results[metric]
  # m_B learned English, m_A Chichewa: m_A reads the English held-out books far worse.
  assert results['en_ppl']['m_A'] > 1.5 * results['en_ppl']['m_B'], results['en_ppl']
  # LoRA trains as many parameters as the bridges, to within half a rank step.
  step = settings['lora_parameters'] / settings['lora_rank']
  assert abs(settings['lora_parameters'] - settings['bridge_parameters']) <= step / 2
  assert settings['pairs'] == {'dc': 1581, 'slice': 271, 'held_out': 345}
  table = (out / 'results.md').read_text()
  assert '46.1' in table and 'm_B + D_C' in table and 'calm_encoder' in table

