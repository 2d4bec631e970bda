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


# With a real anchor (`anchor_checkpoint`): conftest's `gemma_anchor`, a Gemma 3-shaped GGUF
# fixture converted as `calm-convert` converts the real Gemma 3 270M (its vocabulary's BOS is 2).

def test_a_checkpoint_vocabulary_serves_the_tasks_and_they_start_with_its_bos(gemma_anchor,
                                                                               tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  from calm_tasks import lowres  # pylint: disable=g-import-not-at-top
  vocabulary = lowres.bible_vocabulary(gemma_anchor)
  assert vocabulary.bos_id == 2 and not (tmp_path / 'vocab.model').exists()
  lowres.register_bible(gemma_anchor, prefix='gemma_test_')
  own = str(tmp_path / 'spm.model')
  lowres.bible_vocabulary(own, vocab_size=1000)  # T5X-style: no BOS.
  lowres.register_bible(own, prefix='own_test_')
  for prefix, first in (('gemma_test_', 2), ('own_test_', None)):
    for task in ('bible_nya_en', 'bible_en_lm'):
      example = next(seqio.get_mixture_or_task(prefix + task).get_dataset(
          split='validation', shuffle=False).as_numpy_iterator())
      if first is None:
        assert 2 not in example['inputs'][:1], (prefix, task, example['inputs'][:3])
      else:
        assert example['inputs'][0] == first, (prefix, task, example['inputs'][:3])
        # Only one BOS: the source text itself is tokenized without one.
        assert list(example['inputs']).count(first) == 1
      assert example['targets'][-1] == vocabulary.eos_id
  lm = next(seqio.get_mixture_or_task('gemma_test_bible_en_lm').get_dataset(
      split='validation', shuffle=False).as_numpy_iterator())
  assert list(lm['inputs']) == [2]  # An LM row: BOS, then the verse as targets.


def test_translations_are_scored_up_to_their_first_newline():
  from calm_tasks import lowres  # pylint: disable=g-import-not-at-top
  assert lowres.first_line('And Ruth said.\nChichewa: Ndipo') == 'And Ruth said.'
  assert lowres.first_line('No newline here') == 'No newline here'
  assert lowres.first_line('\nlater') == ''


def test_bad_rows_and_a_missing_anchor_are_refused(tmp_path):
  from calm_jax.configs import BridgeConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  config = TransformerConfig(vocab_size=1000, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, head_dim=8, mlp_dim=64)
  common = dict(experiment_dir=str(tmp_path), m_a_config=config, bridge=BridgeConfig(),
                task_feature_lengths={'inputs': 8, 'targets': 8}, m_a_steps=1, m_b_steps=1,
                compose_steps=1, vocab_size=1000)
  with pytest.raises(ValueError, match='Unknown models'):
    lowres_experiment.run_experiment(m_b_config=config, models=['calm', 'gpt'], **common)
  with pytest.raises(ValueError, match='anchor_checkpoint'):
    lowres_experiment.run_experiment(m_b_config=None, **common)
  assert not list(tmp_path.iterdir())  # Refused before anything was written.


@pytest.mark.slow
def test_a_pretrained_anchor_is_composed_as_it_is_and_only_the_chosen_rows_run(gemma_anchor,
                                                                               tmp_path):
  import gguf_fixtures as fx  # pylint: disable=g-import-not-at-top
  from calm_jax import checkpoints, runs  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import BridgeConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  m_a = TransformerConfig(vocab_size=fx.vocab_size('gemma3'), embed_dim=32, num_layers=2,
                          num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=64)
  out = tmp_path / 'gemma'
  lengths = {'inputs': 24, 'targets': 24}
  results = lowres_experiment.run_experiment(
      experiment_dir=str(out), m_a_config=m_a, m_b_config=None,
      bridge=BridgeConfig(connections=((1, 3), (2, 6))), task_feature_lengths=lengths,
      m_a_steps=4, m_b_steps=4, compose_steps=4, batch_size=4, warmup_steps=2,
      eval_examples=4, eval_batch_size=4, anchor_checkpoint=gemma_anchor,
      models=['calm', 'm_B'], log_every=2)
  assert set(results['chrf']) == {'m_B', 'calm'}
  # m_B is the checkpoint itself: nothing pretrained, no vocabulary trained; m_A trained
  # because the composition needs it, and the composition's anchor is the checkpoint.
  assert not (out / 'm_b').exists() and not (out / 'vocab.model').exists()
  assert (out / 'm_a' / 'lm').exists() and not (out / 'lora').exists()
  record = json.loads((out / 'calm' / runs.CALM_RUN_FILE).read_text())
  assert record['anchor_checkpoint'] == gemma_anchor
  config, _ = runs.read_calm_run(out / 'calm')
  assert config.anchor == checkpoints.load_lm_config(gemma_anchor)
  assert results['en_ppl']['m_B'] == pytest.approx(lowres_experiment.perplexity(
      gemma_anchor, lengths, 23))
  saved = json.loads((out / 'results.json').read_text())
  assert saved['settings']['anchor_checkpoint'] == gemma_anchor
  table = (out / 'results.md').read_text()
  assert '| calm |' in table and '| lora |' not in table and 'pretrained' in table


@pytest.mark.slow
def test_an_augment_with_its_own_chichewa_vocabulary_is_composed_with_the_pretrained_anchor(
    gemma_anchor, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  import gguf_fixtures as fx  # pylint: disable=g-import-not-at-top
  from calm_jax import alignment, checkpoints, runs  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import BridgeConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  m_a = TransformerConfig(vocab_size=400, embed_dim=32, num_layers=2, num_heads=2,
                          num_kv_heads=2, head_dim=8, mlp_dim=64)
  out = tmp_path / 'own'
  common = dict(m_a_config=m_a, m_b_config=None, bridge=BridgeConfig(connections=((1, 3),)),
                task_feature_lengths={'inputs': 24, 'targets': 24}, m_a_steps=4, m_b_steps=4,
                compose_steps=4, batch_size=4, warmup_steps=2, eval_examples=4,
                eval_batch_size=4, anchor_checkpoint=gemma_anchor, log_every=2)
  with pytest.raises(ValueError, match='m_a_config.vocab_size is 400'):
    lowres_experiment.run_experiment(experiment_dir=str(out), models=['calm'], **common)
  results = lowres_experiment.run_experiment(
      experiment_dir=str(out), models=['m_A', 'calm'], augment_vocab_size=400, **common)
  assert set(results['chrf']) == {'m_A', 'calm'}
  assert all(math.isfinite(v) for metric in results.values() for v in metric.values())
  # m_A pretrained in its own vocabulary, trained on Chichewa only: no English piece of the
  # anchor's kind, and its embedding has the vocabulary's 400 rows.
  own = seqio.SentencePieceVocabulary(str(out / 'augment_vocab.model'))
  assert own.vocab_size == 400 and checkpoints.load_lm_config(out / 'm_a' / 'lm').vocab_size == 400
  assert fx.vocab_size('gemma3') != 400
  # The composition read both streams: the run records it and keeps the vocabulary's copy.
  config, _ = runs.read_calm_run(out / 'calm')
  assert config.own_tokenizer == ('augment',)
  copied = runs.load_checkpoint(str(out / 'calm')).augment_vocabularies['augment']
  assert alignment.same_vocabulary(copied, own)
  stream = alignment.task_augment_vocabulary(lowres_experiment.ALIGNED_PREFIX + 'bible_dc')
  assert alignment.same_vocabulary(stream, own)
  saved = json.loads((out / 'results.json').read_text())
  assert saved['settings']['augment_vocab_size'] == 400
  assert 'own Chichewa SentencePiece vocabulary' in (out / 'results.md').read_text()
