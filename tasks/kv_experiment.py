"""The key-value arithmetic experiment (CALM section 4.1, Table 1), end to end, on a CPU.

  calm-kv-experiment --gin_file=experiments/kv_arithmetic.gin --gin.EXPERIMENT_DIR="'/tmp/kv'"

Phases, each a calm-train / calm-eval run under EXPERIMENT_DIR (a rerun resumes or skips
finished phases):
  m_a/             pretrain m_A (augment) on KV-Substitution over all keys (asked with '->'
                   or, as KV-Arithmetic asks, '=')
  m_b/             pretrain m_B (anchor) on Numeric-Arithmetic
  calm/            compose m_B + m_A, bridges trained on the mixture kv_composition:
                   KV-Arithmetic over held-in keys with shares of Numeric-Arithmetic and of
                   KV-Substitution over held-in keys (the models' own skills)
  calm_random_m_a/ the ablation: the same composition with an untrained (random) m_A
then every model is evaluated on KV-Substitution, Numeric-Arithmetic and KV-Arithmetic over
held-out keys (never on held-in keys). Writes results.json (accuracy in percent),
results.md (Table 1's layout with the paper's numbers beside ours, and the wall time of each
phase) and results.png. With `seeds` (`--seeds=0,1,2`) it runs once per seed under
EXPERIMENT_DIR/seed_<n>/ and reports the mean and spread of every cell.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath

from calm_jax import random_init
from calm_jax import eval as eval_lib
from calm_jax import train as train_lib
from calm_jax.configs import BridgeConfig, TransformerConfig
from calm_tasks import experiment_runs
from calm_tasks import kv_arithmetic  # Registers the tasks.

DATASETS = {'kv_substitution': 'KV-Substitution', 'numeric_arithmetic': 'Numeric-Arithmetic',
            'kv_arithmetic': 'KV-Arithmetic'}
EVAL_TASKS = {'kv_substitution': 'kv_substitution', 'numeric_arithmetic': 'numeric_arithmetic',
              'kv_arithmetic': 'kv_arithmetic_held_out'}
MODELS = ('m_A', 'm_B', 'calm', 'calm_random_m_A')
# Table 1 of the paper (accuracy %, PaLM2-XXS m_A, PaLM2-XS m_B).
PAPER = {'kv_substitution': {'m_A': 98.1, 'm_B': 0.0, 'calm': 92.9},
         'numeric_arithmetic': {'m_A': 4.2, 'm_B': 73.7, 'calm': 72.0},
         'kv_arithmetic': {'m_A': 0.7, 'm_B': 0.0, 'calm': 84.3}}


def _seconds_line(seconds: Mapping[str, float], unit: str = 'phase') -> str:
  return f'Wall time per {unit}: ' + ', '.join(
      f'{name} {value:.0f} s' for name, value in seconds.items()) + '.'


def write_results(results: Mapping[str, Mapping[str, float]], out_dir: epath.Path,
                  settings: Mapping[str, Any], *,
                  spread: Mapping[str, Any] | None = None) -> None:
  """results.json, results.md (with the paper's numbers) and results.png.

  Args:
    results: {dataset: {model: accuracy %}}, the mean where there are several seeds.
    out_dir: where to write.
    settings: recorded in results.json; its 'seconds' ({phase: s}) go into results.md.
    spread: for several seeds, `_statistics`' output plus 'seeds' and 'per_seed'; cells then
      read 'mean ± std (min-max)' and the chart has min-max error bars.
  """
  record = {'accuracy': results, 'settings': settings, 'paper': PAPER}
  if spread is not None:
    record.update(spread)
  (out_dir / 'results.json').write_text(json.dumps(record, indent=2))

  def cell(key, model):
    if spread is None:
      return f'{results[key][model]:.1f}'
    return (f'{results[key][model]:.1f} ± {spread["std"][key][model]:.1f} '
            f'({spread["min"][key][model]:.1f}-{spread["max"][key][model]:.1f})')

  lines = ['| accuracy % | m_A (ours / paper) | m_B (ours / paper) | CALM (ours / paper) '
           '| CALM with random m_A |', '|---|---|---|---|---|']
  for key, label in DATASETS.items():
    cells = [f'{cell(key, m)} / {PAPER[key][m]:.1f}' for m in ('m_A', 'm_B', 'calm')]
    lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {cell(key, "calm_random_m_A")} |')
  notes = ['KV-Arithmetic is evaluated on expressions over held-out keys only; the composition '
           'was trained on held-in keys.']
  if spread is not None:
    notes.append(f'Seeds {list(spread["seeds"])} (training seed and key repository): mean ± '
                 'sample standard deviation (min-max).')
  if settings.get('seconds'):
    notes.append(_seconds_line(settings['seconds'], 'phase' if spread is None else 'seed'))
  (out_dir / 'results.md').write_text('\n'.join(lines) + '\n\n' + '\n\n'.join(notes) + '\n')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.2
  for i, model in enumerate(MODELS):
    values = [results[k][model] for k in DATASETS]
    errors = None
    if spread is not None:
      errors = [[v - spread['min'][k][model] for k, v in zip(DATASETS, values)],
                [spread['max'][k][model] - v for k, v in zip(DATASETS, values)]]
    bars = ax.bar([j + (i - 1.5) * width for j in range(len(DATASETS))], values, width,
                  yerr=errors, capsize=2, label=model)
    ax.bar_label(bars, fmt='%.0f', fontsize=7)
  ax.set_xticks(range(len(DATASETS)), list(DATASETS.values()))
  ax.set_ylabel('exact-match accuracy (%)')
  ax.set_ylim(0, 105)
  title = 'Key-value arithmetic (KV-Arithmetic on held-out keys)'
  if spread is not None:
    title += f', {len(spread["seeds"])} seeds'
  ax.set_title(title)
  ax.legend(fontsize=8, loc='upper right')
  fig.tight_layout()
  fig.savefig(str(out_dir / 'results.png'), dpi=120)
  plt.close(fig)


def run_experiment(*, experiment_dir: str, m_a_config: TransformerConfig,
                   m_b_config: TransformerConfig, bridge: BridgeConfig,
                   task_feature_lengths: Mapping[str, int], m_a_steps: int, m_b_steps: int,
                   compose_steps: int, batch_size: int = 64,
                   m_a_learning_rate: float = 1e-3, m_b_learning_rate: float = 1e-3,
                   compose_learning_rate: float = 1e-3, weight_decay: float = 0.0,
                   warmup_steps: int = 100,
                   eval_examples: int | None = None, eval_batch_size: int = 250,
                   seed: int = 0, data_seed: int = 0, seeds: Sequence[int] | None = None,
                   log_every: int = 100,
                   compose_mixture_or_task_name: str = kv_arithmetic.COMPOSITION_MIXTURE,
                   config_text: str | None = None) -> dict[str, dict[str, float]]:
  """Runs every phase (see the module docstring) and returns {dataset: {model: accuracy %}}.

  Args:
    experiment_dir: EXPERIMENT_DIR, where every run and the results go.
    m_a_config: the augment's architecture.
    m_b_config: the anchor's architecture.
    bridge: the bridges' configuration.
    task_feature_lengths: {'inputs': ..., 'targets': ...}.
    m_a_steps, m_b_steps, compose_steps: training steps of each phase.
    batch_size: training batch of every phase.
    m_a_learning_rate, m_b_learning_rate, compose_learning_rate: AdamW peak rates (cosine).
    weight_decay: AdamW's decoupled weight decay in every phase.
    warmup_steps: linear warmup of every phase.
    eval_examples: evaluate this many examples per task (default: the whole split).
    eval_batch_size: decoding batch.
    seed: seed of every phase (initialisation and data order).
    data_seed: seed of the key repository: the keys' values and the held-in / held-out split
      (`KVSpec.seed`; 0 is the registered default tasks).
    seeds: run the whole experiment once per seed n (training seed n and data seed n) under
      EXPERIMENT_DIR/seed_<n>/, and report the mean, standard deviation, min and max of every
      cell in EXPERIMENT_DIR/results.*; `seed` and `data_seed` are then ignored. Returns the
      means.
    log_every: steps between progress lines.
    compose_mixture_or_task_name: the composition set D_C: the mixture `kv_composition`
      (KV-Arithmetic over held-in keys with shares of the models' own skills; its rates are
      set with `kv_arithmetic.composition_mixture`), or `kv_arithmetic_held_in` alone.
    config_text: the resolved configuration, written to EXPERIMENT_DIR/config.gin and each
      phase's MODEL_DIR (the command line passes gin's); default: each phase's arguments.
  """
  root = epath.Path(experiment_dir)
  root.mkdir(parents=True, exist_ok=True)
  if config_text is not None:
    (root / train_lib.CONFIG_FILE).write_text(config_text)
  settings = dict(
      m_a_config=m_a_config, m_b_config=m_b_config, bridge=bridge,
      task_feature_lengths=task_feature_lengths, m_a_steps=m_a_steps, m_b_steps=m_b_steps,
      compose_steps=compose_steps, batch_size=batch_size, m_a_learning_rate=m_a_learning_rate,
      m_b_learning_rate=m_b_learning_rate, compose_learning_rate=compose_learning_rate,
      weight_decay=weight_decay, warmup_steps=warmup_steps, eval_examples=eval_examples,
      eval_batch_size=eval_batch_size, log_every=log_every,
      compose_mixture_or_task_name=compose_mixture_or_task_name, config_text=config_text)
  if not seeds:
    return _run_one(root, seed=seed, data_seed=data_seed, **settings)
  seeds = [int(n) for n in seeds]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds must be distinct, got {seeds}.')
  start = time.perf_counter()
  per_seed = []
  for n in seeds:
    logging.info('=== seed %d of %s ===', n, seeds)
    per_seed.append(_run_one(root / f'seed_{n}', seed=n, data_seed=n, **settings))
  stats = experiment_runs.seed_statistics(per_seed, list(DATASETS), MODELS)
  seconds = {f'seed_{n}': json.loads((root / f'seed_{n}' / 'results.json').read_text())[
      'settings']['seconds']['total'] for n in seeds}
  seconds['total'] = time.perf_counter() - start
  spread = dict(seeds=seeds, per_seed={str(n): r for n, r in zip(seeds, per_seed)}, **stats)
  write_results(stats['mean'], root, {'seeds': seeds, 'seconds': seconds,
                                      **_settings_record(compose_mixture_or_task_name)},
                spread=spread)
  logging.info('results over seeds %s in %s: %s', seeds, root, json.dumps(stats['mean']))
  return stats['mean']


def _settings_record(compose_name: str) -> dict[str, Any]:
  return {'composition_set': compose_name,
          'composition_rates': kv_arithmetic.rates(compose_name)}


def _run_one(root: epath.Path, *, seed: int, data_seed: int, m_a_config: TransformerConfig,
             m_b_config: TransformerConfig, bridge: BridgeConfig,
             task_feature_lengths: Mapping[str, int], m_a_steps: int, m_b_steps: int,
             compose_steps: int, batch_size: int, m_a_learning_rate: float,
             m_b_learning_rate: float, compose_learning_rate: float, weight_decay: float,
             warmup_steps: int, eval_examples: int | None, eval_batch_size: int,
             log_every: int, compose_mixture_or_task_name: str,
             config_text: str | None) -> dict[str, dict[str, float]]:
  """One seed of `run_experiment`, under `root`."""
  root.mkdir(parents=True, exist_ok=True)
  task = functools.partial(kv_arithmetic.for_data_seed, data_seed=data_seed)
  compose_name = task(compose_mixture_or_task_name)
  start = time.perf_counter()
  phase = experiment_runs.PhaseRunner(
      root, task_feature_lengths=task_feature_lengths, batch_size=batch_size, seed=seed,
      log_every=log_every, warmup_steps=warmup_steps, weight_decay=weight_decay,
      config_text=config_text)
  timings = phase.seconds
  phase('m_a', mode='pretrain', mixture_or_task_name=task('kv_substitution_augment'),
        model_config=m_a_config, train_steps=m_a_steps, learning_rate=m_a_learning_rate)
  phase('m_b', mode='pretrain', mixture_or_task_name=task('numeric_arithmetic'),
        model_config=m_b_config, train_steps=m_b_steps, learning_rate=m_b_learning_rate)
  compose = dict(mode='compose', mixture_or_task_name=compose_name,
                 anchor_checkpoint=str(root / 'm_b' / 'lm'), bridges={'augment': bridge},
                 train_steps=compose_steps, learning_rate=compose_learning_rate)
  phase('calm', augment_checkpoints={'augment': str(root / 'm_a' / 'lm')}, **compose)
  random_m_a = random_init.random_lm_checkpoint(m_a_config, root / 'm_a_random', seed + 1)
  phase('calm_random_m_a', augment_checkpoints={'augment': random_m_a}, **compose)

  checkpoints_by_model = {'m_A': root / 'm_a' / 'lm', 'm_B': root / 'm_b' / 'lm',
                          'calm': root / 'calm', 'calm_random_m_A': root / 'calm_random_m_a'}
  results: dict[str, dict[str, float]] = {key: {} for key in DATASETS}
  tick = time.perf_counter()
  for model, path in checkpoints_by_model.items():
    metrics = eval_lib.evaluate(
        checkpoint=str(path), mixture_or_task_name=task('kv_arithmetic_eval'),
        task_feature_lengths=task_feature_lengths, batch_size=eval_batch_size,
        eval_dir=str(root / 'eval' / model), num_examples=eval_examples)
    for key, name in EVAL_TASKS.items():
      results[key][model] = metrics[task(name)]['accuracy']
      logging.info('%s on %s: %.1f %%', model, task(name), results[key][model])
  timings['eval'] = time.perf_counter() - tick
  timings['total'] = time.perf_counter() - start
  settings = {
      'kv_spec': dataclasses.asdict(kv_arithmetic.kv_data.KVSpec(seed=data_seed)),
      'seed': seed, 'data_seed': data_seed, 'seconds': timings,
      'steps': {'m_a': m_a_steps, 'm_b': m_b_steps, 'compose': compose_steps},
      'batch_size': batch_size, 'connections': bridge.connections or f'every {bridge.every}',
      **_settings_record(compose_name)}
  write_results(results, root, settings)
  logging.info('results in %s (%.0f s): %s', root, timings['total'], json.dumps(results))
  return results


def main():
  """`python -m calm_tasks.kv_experiment`: `calm_jax.cli.kv_experiment.main`."""
  from calm_jax.cli import kv_experiment as cli  # pylint: disable=g-import-not-at-top
  cli.main()


if __name__ == '__main__':
  main()
