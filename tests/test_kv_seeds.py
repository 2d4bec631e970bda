"""Seeds of the key-value experiment: other key repositories, several runs, mean and spread."""

import json

import numpy as np
import pytest
import seqio

from calm_jax.cli import kv_experiment as cli
from calm_tasks import kv_arithmetic, kv_data
from calm_tasks import kv_experiment


def _pairs(name, n=200):
  ds = seqio.get_mixture_or_task(name).source.get_dataset(split='validation', shuffle=False)
  return [(e['inputs'].numpy().decode(), e['targets'].numpy().decode()) for e in ds.take(n)]


def test_default_data_seed_keeps_the_registered_names():
  for name in kv_arithmetic.TASKS + ('kv_composition', 'kv_arithmetic_eval'):
    assert kv_arithmetic.for_data_seed(name, 0) == name


def test_another_data_seed_is_another_key_repository():
  name = kv_arithmetic.for_data_seed('kv_arithmetic_held_out', 3)
  assert name == 'kv_seed3_kv_arithmetic_held_out'
  spec = kv_data.KVSpec(seed=3)
  repo = kv_data.key_values(spec)
  held_out = set(kv_data.split_keys(spec)[1])
  pairs = _pairs(name)
  for inputs, targets in pairs:
    words = inputs.split()
    assert set(words[0:-1:2]) <= held_out
    assert kv_data.format_number(kv_data.evaluate([repo[k] for k in words[0:-1:2]],
                                                  words[1:-1:2])) == targets
  # And not the default repository: the same keys mean other values there.
  assert repo != kv_data.key_values(kv_data.KVSpec())
  assert set(pairs) != set(_pairs('kv_arithmetic_held_out'))


def test_a_mixture_keeps_its_rates_under_another_data_seed():
  kv_arithmetic.composition_mixture(numeric=0.3, substitution=0.2)
  try:
    name = kv_arithmetic.for_data_seed(kv_arithmetic.COMPOSITION_MIXTURE, 4)
    mixture = seqio.get_mixture_or_task(name)
    assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
        'kv_seed4_kv_arithmetic_held_in': kv_arithmetic.COMPOSITION_RATES['kv_arithmetic_held_in'],
        'kv_seed4_numeric_arithmetic': 0.3, 'kv_seed4_kv_substitution_held_in': 0.2}
  finally:
    kv_arithmetic.composition_mixture()


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match="Unknown task or mixture 'kv_nothing'"):
    kv_arithmetic.for_data_seed('kv_nothing', 1)


def _fake_run_one(calls):
  """A stand-in for one seed's pipeline: results that depend on the seeds it is given."""

  def run_one(root, *, seed, data_seed, **settings):
    calls.append((root.name, seed, data_seed, settings['compose_steps']))
    root.mkdir(parents=True, exist_ok=True)
    results = {key: {model: float(10 * i + j + seed) for j, model in
                     enumerate(kv_experiment.MODELS)}
               for i, key in enumerate(kv_experiment.DATASETS)}
    (root / 'results.json').write_text(json.dumps(
        {'accuracy': results, 'settings': {'seconds': {'total': 5.0 + seed}}}))
    return results

  return run_one


def test_seeds_run_each_seed_in_its_directory_and_report_mean_and_spread(tmp_path,
                                                                         monkeypatch):
  calls = []
  monkeypatch.setattr(kv_experiment, '_run_one', _fake_run_one(calls))
  mean = kv_experiment.run_experiment(
      experiment_dir=str(tmp_path), m_a_config=None, m_b_config=None, bridge=None,
      task_feature_lengths={'inputs': 6, 'targets': 6}, m_a_steps=1, m_b_steps=1,
      compose_steps=7, seeds=[0, 1, 5])
  assert calls == [('seed_0', 0, 0, 7), ('seed_1', 1, 1, 7), ('seed_5', 5, 5, 7)]
  record = json.loads((tmp_path / 'results.json').read_text())
  values = np.array([0.0, 1.0, 5.0])
  for i, key in enumerate(kv_experiment.DATASETS):
    for j, model in enumerate(kv_experiment.MODELS):
      base = 10 * i + j
      assert mean[key][model] == pytest.approx(base + values.mean())
      assert record['accuracy'][key][model] == pytest.approx(base + values.mean())
      assert record['std'][key][model] == pytest.approx(values.std(ddof=1))
      assert record['min'][key][model] == base and record['max'][key][model] == base + 5
      assert record['per_seed']['5'][key][model] == base + 5
  assert record['seeds'] == [0, 1, 5]
  assert record['settings']['seconds']['seed_5'] == 10.0
  table = (tmp_path / 'results.md').read_text()
  assert f'| KV-Arithmetic | 22.0 ± {values.std(ddof=1):.1f} (20.0-25.0) / 0.7 |' in table, table
  assert 'Wall time per seed: seed_0 5 s, seed_1 6 s, seed_5 10 s' in table
  assert 'Seeds [0, 1, 5]' in table
  assert (tmp_path / 'results.png').stat().st_size > 1000


def test_repeated_seeds_are_refused(tmp_path):
  with pytest.raises(ValueError, match='seeds must be distinct'):
    kv_experiment.run_experiment(
        experiment_dir=str(tmp_path), m_a_config=None, m_b_config=None, bridge=None,
        task_feature_lengths={}, m_a_steps=1, m_b_steps=1, compose_steps=1, seeds=[1, 1])


def test_single_run_table_states_the_wall_time_of_each_phase(tmp_path):
  results = {key: {model: 50.0 for model in kv_experiment.MODELS}
             for key in kv_experiment.DATASETS}
  kv_experiment.write_results(results, tmp_path, {'seconds': {'m_a': 61.2, 'eval': 40.0}})
  table = (tmp_path / 'results.md').read_text()
  assert 'Wall time per phase: m_a 61 s, eval 40 s.' in table
  assert '| KV-Substitution | 50.0 / 98.1 | 50.0 / 0.0 | 50.0 / 92.9 | 50.0 |' in table


def test_seeds_flag_becomes_the_gin_binding():
  assert cli.expand_seeds(['prog', '--seeds=0,1,2', '--gin.X=1']) == [
      'prog', '--gin.kv_experiment.run_experiment.seeds=[0, 1, 2]', '--gin.X=1']
  assert cli.expand_seeds(['prog', '--seeds', '3']) == [
      'prog', '--gin.kv_experiment.run_experiment.seeds=[3]']
  with pytest.raises(SystemExit, match='comma-separated integers'):
    cli.expand_seeds(['prog', '--seeds=a,b'])
