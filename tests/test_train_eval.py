"""Evaluation during training: T5X's train_eval and infer_eval at the right steps, equal to an
independent evaluation of the same parameters, continued by a resumed run."""

import numpy as np
import pytest

from calm_jax import checkpoints, data, train_eval
from calm_jax import eval as eval_lib
from calm_jax.losses import cross_entropy_loss
from calm_jax.transformer import Transformer

from test_runs import LENGTHS, _train

TASK = 'numeric_arithmetic'
EVAL = dict(train_eval_mixture_or_task_name=TASK, infer_eval_mixture_or_task_name=TASK,
            eval_period=2, eval_steps=2, eval_batch_size=8, infer_eval_examples=16)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp('train_eval') / 'run'
  _train(path, train_steps=6, save_every=3, run_eval_before_training=True, **EVAL)
  return path


def test_evaluations_happen_at_the_schedules_steps(run):
  records = train_eval.read_metrics(run)
  assert [r['step'] for r in records] == [0, 2, 4, 6]
  for record in records:
    assert set(record['training_eval']) == {TASK}
    assert set(record['training_eval'][TASK]) == {'loss', 'accuracy'}
    assert np.isfinite(record['training_eval'][TASK]['loss'])
    assert 0 <= record['inference_eval'][TASK]['accuracy'] <= 100
  assert records[-1]['training_eval'][TASK]['loss'] < records[0]['training_eval'][TASK]['loss']
  assert any((run / 'eval').glob('events.out.tfevents.*'))  # TensorBoard, MODEL_DIR/eval.


def test_train_eval_equals_an_independent_teacher_forced_loss(run):
  config, params = checkpoints.load_lm(run / 'lm')  # The parameters of step 6.
  ds = data.get_dataset(TASK, LENGTHS, 'validation', 8, shuffle=False, num_epochs=1)
  loss = weight = correct = 0.0
  for batch in data.as_numpy_batches(ds.take(2)):
    logits = Transformer(config).apply({'params': params}, batch['decoder_input_tokens']).logits
    out = cross_entropy_loss(logits, batch['decoder_target_tokens'],
                             batch['decoder_loss_weights'])
    loss += float(out.cross_entropy * out.weight_sum)
    correct += float(out.accuracy * out.weight_sum)
    weight += float(out.weight_sum)
  recorded = train_eval.read_metrics(run)[-1]['training_eval'][TASK]
  np.testing.assert_allclose(recorded['loss'], loss / weight, rtol=1e-5)
  np.testing.assert_allclose(recorded['accuracy'], correct / weight, rtol=1e-5)


def test_infer_eval_equals_calm_eval_of_the_same_parameters(run, tmp_path):
  metrics = eval_lib.evaluate(checkpoint=str(run / 'lm'), mixture_or_task_name=TASK,
                              task_feature_lengths=LENGTHS, batch_size=8,
                              eval_dir=str(tmp_path / 'eval'), num_examples=16)
  recorded = train_eval.read_metrics(run)[-1]['inference_eval'][TASK]
  assert recorded == pytest.approx(metrics[TASK])


def test_a_resumed_run_continues_the_schedule(tmp_path):
  path = tmp_path / 'run'
  lines = []
  _train(path, train_steps=4, save_every=2, **EVAL)
  _train(path, train_steps=8, save_every=2, log=lines.append, **EVAL)
  assert any('resumed from step 4' in line for line in lines)
  assert [r['step'] for r in train_eval.read_metrics(path)] == [2, 4, 6, 8]
  assert any(line.startswith('eval at step 6') and 'training_eval/numeric_arithmetic/loss'
             in line for line in lines)


def test_a_bad_eval_period_is_named(tmp_path):
  with pytest.raises(ValueError, match='eval_period must be positive'):
    _train(tmp_path / 'run', train_steps=2, **{**EVAL, 'eval_period': 0})
