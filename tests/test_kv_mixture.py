"""The composition set D_C as a SeqIO mixture: rates reach the batches, held-out keys never do."""

import gin
import numpy as np
import pytest
import seqio

from calm_jax import data
from calm_jax.cli import gin_cli
from calm_tasks import kv_arithmetic, kv_data

SPEC = kv_data.KVSpec()
LENGTHS = {'inputs': 6, 'targets': 6}


def _kind(inputs: str, targets: str) -> str:
  """Which task an example comes from, by its form alone."""
  if not inputs.startswith('k'):
    return 'numeric_arithmetic'
  # A substitution's target is an expression ('3 + 7 - 2'), an arithmetic's a number, digit by
  # digit ('- 1 2').
  words = targets.split()
  is_expression = len(words) > 1 and words[1] in ('+', '-')
  return 'kv_substitution_held_in' if is_expression else 'kv_arithmetic_held_in'


@pytest.mark.parametrize('name', [kv_arithmetic.COMPOSITION_MIXTURE])
def test_no_training_task_of_the_mixture_holds_a_held_out_key(name):
  """Every training example of every task, read through its registered seqio source."""
  held_out = {k.encode() for k in kv_data.split_keys(SPEC)[1]}
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name for t in mixture.tasks} == set(kv_arithmetic.COMPOSITION_RATES)
  for task in mixture.tasks:
    seen = 0
    for batch in task.source.get_dataset(split='train', shuffle=False).batch(
        20_000).as_numpy_iterator():
      words = set(b' '.join(batch['inputs']).split()) | set(b' '.join(batch['targets']).split())
      assert not words & held_out, (task.name, sorted(words & held_out)[:5])
      seen += len(batch['inputs'])
    assert seen == kv_arithmetic.TRAIN_EXAMPLES
  # The check can fail: the evaluation task's examples are made of held-out keys.
  control = seqio.get_mixture_or_task('kv_arithmetic_held_out').source.get_dataset(
      split='validation', shuffle=False).batch(100).take(1).get_single_element()
  assert set(b' '.join(control['inputs'].numpy()).split()) & held_out


def test_substitution_held_in_is_the_held_in_keys_only():
  held_in = set(kv_data.split_keys(SPEC)[0])
  task = seqio.get_mixture_or_task('kv_substitution_held_in')
  keys = set()
  for example in task.source.get_dataset(split='train', shuffle=False).take(2000):
    keys |= {w for w in example['inputs'].numpy().decode().split() if w.startswith('k')}
  assert keys <= held_in and len(keys) > 0.9 * len(held_in)


def test_existing_tasks_keep_their_examples():
  """Adding a task must not reseed the others (their index in TASKS seeds their streams)."""
  assert kv_arithmetic.TASKS[:5] == ('kv_substitution', 'numeric_arithmetic',
                                     'kv_arithmetic_held_in', 'kv_arithmetic_held_out',
                                     'kv_substitution_held_in')


@pytest.mark.parametrize('rates', [(0.5, 0.25, 0.25), (0.8, 0.2, 0.0)])
def test_mixture_rates_reach_the_batches(rates):
  arithmetic, numeric, substitution = rates
  name = kv_arithmetic.composition_mixture(arithmetic, numeric, substitution)
  try:
    ds = data.get_dataset(name, LENGTHS, 'train', batch_size=500, seed=1)
    vocab = kv_arithmetic.vocabulary(SPEC)
    counts = {task: 0 for task in kv_arithmetic.COMPOSITION_RATES}
    total = 0
    for batch in data.as_numpy_batches(ds.take(8)):
      for tokens, weights in zip(batch['decoder_target_tokens'],
                                 batch['decoder_loss_weights']):
        # Prefix-LM rows: the inputs (no loss), then the targets (loss), then padding (0).
        inputs = vocab.decode([int(t) for t, w in zip(tokens, weights) if t and not w])
        targets = vocab.decode([int(t) for t, w in zip(tokens, weights) if w])
        counts[_kind(inputs, targets)] += 1
        total += 1
  finally:
    kv_arithmetic.composition_mixture()  # The default rates again for other tests.
  expected = dict(zip(('kv_arithmetic_held_in', 'numeric_arithmetic', 'kv_substitution_held_in'),
                      np.array(rates) / sum(rates)))
  for task, share in expected.items():
    sigma = np.sqrt(share * (1 - share) / total)
    assert abs(counts[task] / total - share) <= 4 * sigma + 1e-9, (task, counts, total)


def test_rates_are_checked():
  with pytest.raises(ValueError, match='rates must be'):
    kv_arithmetic.composition_mixture(0.0, 1.0, 1.0)


def _probe(*, name):
  return name


def test_the_shares_are_set_from_gin(tmp_path):
  run_file = tmp_path / 'mixture.gin'
  run_file.write_text('\n'.join([
      'from __gin__ import dynamic_registration', 'from calm_tasks import kv_arithmetic',
      'MIXTURE_OR_TASK_NAME = @kv_arithmetic.composition_mixture()',
      'kv_arithmetic.composition_mixture.numeric = 0.3',
      'kv_arithmetic.composition_mixture.substitution = 0.0']))
  gin.clear_config()
  try:
    gin_cli.configurable(_probe)
    gin_cli.parse_gin([str(run_file)], ['_probe.name = %MIXTURE_OR_TASK_NAME'])
    assert gin_cli.call_with_gin(_probe) == kv_arithmetic.COMPOSITION_MIXTURE
    mixture = seqio.get_mixture_or_task(kv_arithmetic.COMPOSITION_MIXTURE)
    assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
        'kv_arithmetic_held_in': kv_arithmetic.COMPOSITION_RATES['kv_arithmetic_held_in'],
        'numeric_arithmetic': 0.3}
  finally:
    gin.clear_config()
    kv_arithmetic.composition_mixture()


def test_every_question_of_the_mixture_has_one_answer():
  """KV-Substitution and KV-Arithmetic share keys; their questions must still differ (a
  mixture where one input has two targets teaches the bridges to guess between them)."""
  answers = {}
  for task in seqio.get_mixture_or_task(kv_arithmetic.COMPOSITION_MIXTURE).tasks:
    for example in task.source.get_dataset(split='train', shuffle=False).take(5000):
      inputs, targets = example['inputs'].numpy(), example['targets'].numpy()
      assert answers.setdefault(inputs, targets) == targets, (task.name, inputs, targets,
                                                              answers[inputs])
  assert len(answers) > 10_000
  # The control: without the substitution marker the same keys' questions collide.
  sub = kv_data.kv_substitution(SPEC, 3000, seed=7, keys='held_in')
  arith = {i for i, _ in kv_data.kv_arithmetic(SPEC, 3000, seed=8, keys='held_in')}
  assert {i.replace(kv_data.SUBSTITUTE, kv_data.EQUALS) for i, _ in sub} & arith
