"""calm-infer, calm-export and calm-eval on a real (tiny) composition run."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import composed, data, decoding, runs
from calm_jax import eval as eval_lib
from calm_jax import export as export_lib
from calm_jax import infer as infer_lib
from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import BridgeConfig
from calm_tasks import kv_arithmetic  # pylint: disable=unused-import

from test_runs import LENGTHS, _train

TASK = 'kv_arithmetic_held_out'
EXAMPLES = 6


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny pretrained LM composed with itself through live bridges (a few steps each)."""
  root = tmp_path_factory.mktemp('runs')
  _train(root / 'lm')
  _train(root / 'calm', mode='compose', mixture_or_task_name='kv_arithmetic_held_in',
         anchor_checkpoint=str(root / 'lm' / 'lm'), augment_checkpoints={'augment': str(root / 'lm' / 'lm')},
         bridges={'augment': BridgeConfig(connections=((1, 1), (2, 2)), zero_init_out=False)}, train_steps=3)
  return root / 'calm'


def _predictions(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _features(n):
  ds = data.get_dataset(TASK, LENGTHS, 'validation', n, shuffle=False, num_epochs=1)
  return next(ds.as_numpy_iterator())


def test_infer_writes_t5x_style_jsonl_equal_to_the_reference_decoder(run, tmp_path):
  written = infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK,
                            task_feature_lengths=LENGTHS, output_dir=str(tmp_path),
                            batch_size=4, num_examples=EXAMPLES, log=lambda _: None)
  path = tmp_path / f'{TASK}-000003.jsonl'  # The run's step.
  assert written == {TASK: str(path)}
  records = _predictions(path)
  assert len(records) == EXAMPLES
  assert all({'inputs', 'targets', 'prediction', 'prediction_tokens'} <= set(r) for r in records)
  # Same tokens as the uncached argmax loop over full forward passes, example by example.
  loaded = runs.load_checkpoint(str(run))
  features = _features(EXAMPLES)
  eos = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).eos_id

  def reference(params, tokens, prompt):
    def logits_fn(t):
      return loaded.model.apply({'params': params}, t, prompt_mask=prompt).logits
    return decoding.greedy_decode(logits_fn, tokens, prompt, LENGTHS['targets'], eos)

  expected = np.asarray(jax.jit(reference)(loaded.params, features['decoder_input_tokens'],
                                           features['decoder_causal_attention']))
  np.testing.assert_array_equal([r['prediction_tokens'] for r in records], expected)


def test_export_then_infer_gives_the_same_predictions(run, tmp_path):
  out = tmp_path / 'export'
  result = export_lib.export(checkpoint=str(run), output_dir=str(out), mixture_or_task_name=TASK,
                             serving_prompt_length=LENGTHS['inputs'] + LENGTHS['targets'],
                             max_decode_len=LENGTHS['targets'], log=lambda _: None)
  assert result.metadata['step'] == 3
  assert result.vocabulary.eos_id == 1
  for checkpoint, name in ((run, 'a'), (out, 'b')):
    infer_lib.infer(checkpoint=str(checkpoint), mixture_or_task_name=TASK,
                    task_feature_lengths=LENGTHS, output_dir=str(tmp_path / name),
                    batch_size=4, num_examples=EXAMPLES, log=lambda _: None)
  a = _predictions(tmp_path / 'a' / f'{TASK}-000003.jsonl')
  b = _predictions(tmp_path / 'b' / f'{TASK}-000003.jsonl')
  assert a == b
  # The serving artifact on the same examples (batch 6 through a symbolic batch dimension).
  features = _features(EXAMPLES)
  serve = composed.load_serving(out)
  tokens = serve(result.params, features['decoder_input_tokens'].astype(np.int32),
                 features['decoder_causal_attention'].astype(np.int32),
                 jax.random.key_data(jax.random.key(0)))
  np.testing.assert_array_equal(tokens, [r['prediction_tokens'] for r in a])


def test_eval_metrics_agree_with_the_predictions(run, tmp_path):
  metrics = eval_lib.evaluate(checkpoint=str(run), mixture_or_task_name=TASK,
                              task_feature_lengths=LENGTHS, batch_size=4,
                              eval_dir=str(tmp_path), num_examples=EXAMPLES)
  infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                  output_dir=str(tmp_path / 'p'), batch_size=4, num_examples=EXAMPLES,
                  log=lambda _: None)
  records = _predictions(tmp_path / 'p' / f'{TASK}-000003.jsonl')
  accuracy = 100 * np.mean([r['prediction'] == r['targets'] for r in records])
  assert metrics[TASK]['accuracy'] == pytest.approx(accuracy)


def test_export_refuses_an_lm_checkpoint(run, tmp_path):
  with pytest.raises(CheckpointError, match='LM checkpoint'):
    export_lib.export(checkpoint=str(run.parent / 'lm' / 'lm'), output_dir=str(tmp_path / 'x'),
                      log=lambda _: None)
  with pytest.raises(CheckpointError, match='does not exist'):
    runs.load_checkpoint(str(tmp_path / 'nowhere'))


def test_calm_infer_command_line(run, tmp_path, repo_root):
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.infer', '--gin_file=runs/infer.gin',
       '--gin_file=tasks/kv_arithmetic.gin', f'--gin.CHECKPOINT="{run}"',
       f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
       f'--gin.INFER_OUTPUT_DIR="{tmp_path}"', '--gin.BATCH_SIZE=4',
       '--gin.infer.num_examples=3', '--gin.infer.num_beams=2'],
      capture_output=True, text=True, timeout=600, cwd=repo_root, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_predictions(tmp_path / f'{TASK}-000003.jsonl')) == 3
