"""The code experiment at its small setting: every phase and every cell."""

import json
import math
import os
import subprocess
import sys

import pytest

from calm_tasks import code_experiment


@pytest.mark.slow
def test_small_pipeline_end_to_end(tmp_path):
  out = tmp_path / 'code'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.code_experiment',
       '--gin_file=experiments/code_stdlib_small.gin', f"--gin.EXPERIMENT_DIR='{out}'"],
      capture_output=True, text=True, timeout=1800, env=env, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ('results.json', 'results.md', 'results.png', 'config.gin', 'vocab.model'):
    assert (out / name).exists(), name
  record = json.loads((out / 'results.json').read_text())
  results, settings = record['results'], record['settings']
  for metric in code_experiment.METRICS:
    assert set(results[metric]) == set(code_experiment.DEFAULT_MODELS), metric
    assert all(math.isfinite(v) for v in results[metric].values()), results[metric]
  # m_A learned code and m_B English: m_B reads the held-out code far worse than m_A, and m_A
  # the held-out English worse than m_B (30 steps each: less apart).
  assert results['code_ppl']['m_B'] > 1.5 * results['code_ppl']['m_A'], results['code_ppl']
  assert results['en_ppl']['m_A'] > results['en_ppl']['m_B'], results['en_ppl']
  assert settings['pairs']['held_out'] > 200 and settings['python']
  # HumanEval ran in the sandbox: per-problem results beside the predictions (16 problems).
  rows = (out / 'eval' / 'calm' / 'humaneval-000015-results.jsonl').read_text().splitlines()
  assert len(rows) == 16 and all('status' in json.loads(r) for r in rows)
  table = (out / 'results.md').read_text()
  assert '22.5' in table and 'm_B + D_C' in table and 'HumanEval' in table
