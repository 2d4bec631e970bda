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


def test_a_missing_anchor_or_one_without_a_vocabulary_is_refused(tmp_path):
  from calm_jax import random_init  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import BridgeConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  config = TransformerConfig(vocab_size=1000, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, head_dim=8, mlp_dim=64)
  out = tmp_path / 'out'
  common = dict(experiment_dir=str(out), m_a_config=config, bridge=BridgeConfig(),
                task_feature_lengths={'inputs': 8, 'targets': 8}, m_a_steps=1, m_b_steps=1,
                compose_steps=1, vocab_size=1000)
  with pytest.raises(ValueError, match='anchor_checkpoint'):
    code_experiment.run_experiment(m_b_config=None, **common)
  bare = random_init.random_lm_checkpoint(config, tmp_path / 'bare', 0)  # No vocabulary.
  with pytest.raises(ValueError, match='has no vocabulary'):
    code_experiment.run_experiment(m_b_config=None, anchor_checkpoint=str(bare), **common)
  with pytest.raises(ValueError, match='Unknown models'):
    code_experiment.run_experiment(m_b_config=config, models=['calm', 'gpt'], **common)
  assert not out.exists()  # Refused before anything was written.


@pytest.mark.slow
def test_a_pretrained_anchor_is_composed_in_its_own_vocabulary(gemma_anchor, tmp_path):
  import gguf_fixtures as fx  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from calm_jax import checkpoints, runs  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import BridgeConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  from calm_tasks import experiment_runs  # pylint: disable=g-import-not-at-top
  m_a = TransformerConfig(vocab_size=fx.vocab_size('gemma3'), embed_dim=32, num_layers=2,
                          num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=64)
  out = tmp_path / 'gemma'
  lengths = {'inputs': 24, 'targets': 16}
  results = code_experiment.run_experiment(
      experiment_dir=str(out), m_a_config=m_a, m_b_config=None,
      bridge=BridgeConfig(connections=((1, 3), (2, 6))), task_feature_lengths=lengths,
      m_a_steps=4, m_b_steps=4, compose_steps=4, batch_size=4, warmup_steps=2,
      eval_examples=4, humaneval_examples=2, humaneval_lengths={'inputs': 48, 'targets': 8},
      eval_batch_size=4, perplexity_batch_size=4, perplexity_batches=1,
      anchor_checkpoint=gemma_anchor, models=['calm', 'm_B'], log_every=2)
  for metric in code_experiment.METRICS:
    assert set(results[metric]) == {'m_B', 'calm'}, metric
    assert all(math.isfinite(v) for v in results[metric].values()), results[metric]
  # m_B is the checkpoint: nothing pretrained and no vocabulary trained; m_A trained for the
  # composition, whose anchor is the checkpoint.
  assert not (out / 'm_b').exists() and not (out / 'vocab.model').exists()
  assert (out / 'm_a' / 'lm').exists() and not (out / 'lora').exists()
  config, _ = runs.read_calm_run(out / 'calm')
  assert config.anchor == checkpoints.load_lm_config(gemma_anchor)
  # Every task is in the checkpoint's vocabulary and reads its BOS first, once.
  example = next(seqio.get_mixture_or_task('stdlib_code_to_text').get_dataset(
      split='validation', shuffle=False).as_numpy_iterator())
  assert example['inputs'][0] == 2 and list(example['inputs']).count(2) == 1
  assert max(example['inputs']) < fx.vocab_size('gemma3')
  # Perplexity on the first batch only, as asked.
  assert results['code_ppl']['m_B'] == pytest.approx(experiment_runs.perplexity(
      gemma_anchor, lengths, 4, 'stdlib_code_lm', 1))
  saved = json.loads((out / 'results.json').read_text())
  assert saved['settings']['anchor_checkpoint'] == gemma_anchor
  assert saved['settings']['perplexity_batches'] == 1
  table = (out / 'results.md').read_text()
  assert '| calm |' in table and '| lora |' not in table and 'pretrained' in table
