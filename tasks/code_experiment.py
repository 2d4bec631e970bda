"""The code experiment (CALM section 4.3, Table 4) on the Python standard library, on a CPU.

  calm-code-experiment --gin_file=experiments/code_stdlib.gin \
      --gin.EXPERIMENT_DIR="'/tmp/calm_code'"

Data (`calm_tasks.code`, `code_data`): the running interpreter's standard library, split by
top-level module name (10 % held out); English is the KJV's training books and the training
modules' docstring prose. Phases (`experiment_runs.train_rows`), each a calm-train run under
EXPERIMENT_DIR (a rerun resumes or skips finished phases):
  vocab.model       one whitespace-exact SentencePiece vocabulary (training text only)
  m_a/              pretrain m_A (augment) on the training modules' code      (stdlib_code_lm)
  m_b/              pretrain m_B (anchor) on English                           (stdlib_en_lm)
  calm/             compose m_B + m_A, bridges trained on D_C (7 % of the training pairs as
                    code->text and text->code, with English)                   (stdlib_dc)
  m_b_dc/           m_B fully fine-tuned on D_C (the paper's "m_B + Code" row)
  lora/             LoRA on m_B of the bridges' parameter count, on D_C
  calm_random_m_a/  the composition with an untrained m_A
then every model is scored on code->text of the held-out modules (greedy; chrF1 and BLEU,
sacrebleu), HumanEval pass@1 (0-shot, greedy, each completion run in calm_jax.sandbox), and
the held-out English and code perplexities. Writes results.json, results.md (Table 4's layout
with the paper's numbers beside ours) and results.png; with `seeds`, mean and spread.

With a real anchor (`anchor_checkpoint`, e.g. `calm-convert`'s Gemma 3 270M,
gin/experiments/code_stdlib_gemma3.gin): m_B is that checkpoint, not pretrained here; every
task uses its vocabulary instead of vocab.model (m_A is trained in it, and every row reads its
BOS first where its models read one); `models` picks the rows that are run.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath

from calm_jax import checkpoints
from calm_jax import eval as eval_lib
from calm_jax import train as train_lib
from calm_jax.configs import BridgeConfig, TransformerConfig
from calm_jax import vocab as vocab_lib
from calm_tasks import code, experiment_runs

DEFAULT_MODELS = ('m_A', 'm_B', 'calm', 'm_B + D_C', 'lora', 'calm_random_m_A')
METRICS = {'humaneval': 'HumanEval pass@1', 'chrf': 'code->text chrF1', 'bleu': 'code->text BLEU',
           'en_ppl': 'English perplexity', 'code_ppl': 'code perplexity'}
# Table 4: HumanEval pass@1 (0-shot) and CodeXGLUE code-to-text Python chrF1 (3-shot).
PAPER = {'humaneval': {'m_A': 19.5, 'm_B': 16.4, 'calm': 22.5, 'm_B + D_C': 24.3},
         'chrf': {'m_A': 28.0, 'm_B': 30.4, 'calm': 30.5, 'm_B + D_C': 18.9}}
COLORS = {'m_A': '#888', 'm_B': '#888', 'calm': '#1f77b4', 'm_B + D_C': '#ff7f0e',
          'lora': '#2ca02c', 'calm_random_m_A': '#bbb', 'calm_encoder': '#bbb'}


def write_results(results: Mapping[str, Mapping[str, float]], out_dir: epath.Path,
                  settings: Mapping[str, Any], spread: Mapping[str, Any] | None = None) -> None:
  """results.json, results.md (Table 4's layout, the paper's numbers beside) and results.png.

  Args:
    results: {metric: {model: value}} (the mean over seeds where there are several).
    out_dir: where to write.
    settings: recorded in results.json; its 'seconds' go into results.md.
    spread: for several seeds: 'seeds', 'std', 'min', 'max' ({metric: {model: value}}).
  """
  record = {'results': results, 'settings': settings, 'paper': PAPER}
  if spread is not None:
    record.update(spread)
  (out_dir / 'results.json').write_text(json.dumps(record, indent=2))
  models = [m for m in experiment_runs.ROW_PATHS if m in results['chrf']]

  def cell(metric, model):
    value = results[metric][model]
    text = f'{value:.2f}' if metric.endswith('ppl') else f'{value:.1f}'
    if spread is not None:
      text += (f' ± {spread["std"][metric][model]:.1f} '
               f'({spread["min"][metric][model]:.1f}-{spread["max"][metric][model]:.1f})')
    return text

  lines = ['| model | HumanEval P@1 (ours) | paper | code->text chrF1 (ours) | paper (CodeXGLUE '
           'Python) | code->text BLEU | English ppl | code ppl |',
           '|---|---|---|---|---|---|---|---|']
  for model in models:
    lines.append(f'| {model} | {cell("humaneval", model)} | '
                 f'{PAPER["humaneval"].get(model, "-")} | {cell("chrf", model)} | '
                 f'{PAPER["chrf"].get(model, "-")} | {cell("bleu", model)} | '
                 f'{cell("en_ppl", model)} | {cell("code_ppl", model)} |')
  notes = [f'Held-out standard-library modules (Python {settings.get("python", "?")}): '
           f'{settings.get("pairs", {}).get("held_out", "?")} functions, code->text scored '
           'on the first non-empty line with sacrebleu (chrF with beta 1, BLEU); HumanEval 0-shot, '
           'greedy, every completion run in calm_jax.sandbox; perplexities per token of the '
           'shared vocabulary on held-out English (KJV held-out books, held-out docstrings) '
           'and held-out code.']
  if settings.get('anchor_checkpoint'):
    notes.append(f'm_B: the pretrained {settings["anchor_checkpoint"]}, in its vocabulary '
                 '(every row\'s perplexities are per token of that vocabulary).')
  if spread is not None:
    notes.append(f'Seeds {list(spread["seeds"])}: mean ± sample standard deviation (min-max).')
  if settings.get('seconds'):
    notes.append('Wall time per phase: ' + ', '.join(
        f'{k} {v:.0f} s' for k, v in settings['seconds'].items()) + '.')
  (out_dir / 'results.md').write_text('\n'.join(lines) + '\n\n' + '\n\n'.join(notes) + '\n')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, metric in zip(axes, ('chrf', 'humaneval', 'en_ppl')):
    values = [results[metric][m] for m in models]
    errors = None
    if spread is not None:
      errors = [[v - spread['min'][metric][m] for m, v in zip(models, values)],
                [spread['max'][metric][m] - v for m, v in zip(models, values)]]
    bars = ax.bar(range(len(models)), values, yerr=errors, capsize=2,
                  color=[COLORS[m] for m in models])
    ax.bar_label(bars, fmt='%.1f', fontsize=7)
    ax.set_xticks(range(len(models)), models, rotation=30, ha='right', fontsize=8)
    if metric == 'en_ppl':
      ax.set_yscale('log')
    else:
      ax.set_ylim(0, max(1.0, 1.15 * max(values)))  # All-zero HumanEval cells stay readable.
    suffix = {'en_ppl': ' (held-out, log scale, lower is better)', 'chrf': ' (held-out modules)',
              'humaneval': ' (164 problems)'}[metric]
    ax.set_title(METRICS[metric] + suffix, fontsize=9)
  fig.tight_layout()
  fig.savefig(str(out_dir / 'results.png'), dpi=120)
  plt.close(fig)


def run_experiment(*, experiment_dir: str, m_a_config: TransformerConfig,
                   m_b_config: TransformerConfig | None, bridge: BridgeConfig,
                   task_feature_lengths: Mapping[str, int], m_a_steps: int, m_b_steps: int,
                   compose_steps: int, finetune_steps: int | None = None,
                   lora_steps: int | None = None, batch_size: int = 32,
                   learning_rate: float = 3e-3, compose_learning_rate: float = 1e-3,
                   finetune_learning_rate: float = 3e-4, lora_learning_rate: float = 1e-3,
                   weight_decay: float = 0.01, warmup_steps: int = 100,
                   pack_pretraining: bool = True, vocab_size: int = code.VOCAB_SIZE,
                   shots: int = 0, eval_examples: int | None = None,
                   humaneval_examples: int | None = None,
                   humaneval_lengths: Mapping[str, int] | None = None,
                   eval_batch_size: int = 64, perplexity_batch_size: int = 16,
                   perplexity_batches: int | None = None, seed: int = 0,
                   seeds: Sequence[int] | None = None, log_every: int = 100,
                   models: Sequence[str] = DEFAULT_MODELS,
                   anchor_checkpoint: str | None = None,
                   config_text: str | None = None) -> dict[str, dict[str, float]]:
  """Runs every phase (module docstring); returns {metric: {model: value}}.

  Args:
    experiment_dir: EXPERIMENT_DIR, where every run and the results go.
    m_a_config, m_b_config: the augment's and the anchor's architectures (vocab_size must be
      `vocab_size`, or the anchor checkpoint's; m_b_config is ignored with
      `anchor_checkpoint`).
    bridge: the bridges' configuration.
    task_feature_lengths: {'inputs': ..., 'targets': ...} of training and code->text.
    m_a_steps, m_b_steps, compose_steps: training steps of pretraining and of each
      composition; finetune_steps, lora_steps: of the D_C baselines (default compose_steps).
    batch_size: training batch of every phase.
    learning_rate: AdamW peak rate of pretraining (cosine).
    compose_learning_rate, finetune_learning_rate, lora_learning_rate: of the D_C phases.
    weight_decay: AdamW's decoupled weight decay.
    warmup_steps: linear warmup of every phase.
    pack_pretraining: pack several examples per row when pretraining m_A and m_B.
    vocab_size: pieces of the vocabulary trained at EXPERIMENT_DIR/vocab.model.
    shots: k of the code->text prompts.
    eval_examples: score this many held-out functions (default all).
    humaneval_examples: run this many HumanEval problems (default all 164).
    humaneval_lengths: HumanEval's {'inputs', 'targets'} (prompt and completion tokens;
      default {'inputs': 640, 'targets': 128}; a longer prompt loses its beginning).
    eval_batch_size: decoding batch.
    perplexity_batch_size: teacher-forced batch.
    perplexity_batches: score the first this many batches of each held-out text (default all;
      a real anchor's 262K-way output makes every batch costly on a CPU).
    seed: seed of every phase.
    seeds: run once per seed under EXPERIMENT_DIR/seed_<n>/ and report mean and spread.
    log_every: steps between progress lines.
    models: the rows to run (of experiment_runs.ROW_PATHS).
    anchor_checkpoint: a pretrained LM checkpoint with a vocabulary to use as m_B (its
      architecture and vocabulary; m_B is not pretrained and vocab_size is unused).
    config_text: the resolved configuration (the command line passes gin's).

  Raises:
    ValueError: a vocabulary size that does not match, an unknown model, no anchor, or an
      anchor checkpoint without a vocabulary.
  """
  root = epath.Path(experiment_dir)
  if anchor_checkpoint is not None:
    if not vocab_lib.has_vocabulary(epath.Path(anchor_checkpoint)):
      raise ValueError(f'The anchor checkpoint {anchor_checkpoint} has no vocabulary (the '
                       'tasks are tokenized in it); convert it with calm-convert.')
    m_b_config = checkpoints.load_lm_config(anchor_checkpoint)
    vocab_size = m_b_config.vocab_size
  elif m_b_config is None:
    raise ValueError('Give m_b_config (the anchor to pretrain) or anchor_checkpoint.')
  for name, config in (('m_a_config', m_a_config), ('m_b_config', m_b_config)):
    if config.vocab_size != vocab_size:
      raise ValueError(f'{name}.vocab_size is {config.vocab_size}, but the vocabulary has '
                       f'{vocab_size} pieces.')
  unknown = sorted(set(models) - set(experiment_runs.ROW_PATHS))
  if unknown:
    raise ValueError(f'Unknown models {unknown}; known: {list(experiment_runs.ROW_PATHS)}.')
  root.mkdir(parents=True, exist_ok=True)
  if config_text is not None:
    (root / train_lib.CONFIG_FILE).write_text(config_text)
  models = [m for m in experiment_runs.ROW_PATHS if m in models]
  settings = dict(m_a_config=m_a_config, m_b_config=m_b_config, bridge=bridge,
                  task_feature_lengths=dict(task_feature_lengths), m_a_steps=m_a_steps,
                  m_b_steps=m_b_steps, compose_steps=compose_steps,
                  finetune_steps=finetune_steps or compose_steps,
                  lora_steps=lora_steps or compose_steps, batch_size=batch_size,
                  learning_rate=learning_rate, compose_learning_rate=compose_learning_rate,
                  finetune_learning_rate=finetune_learning_rate,
                  lora_learning_rate=lora_learning_rate, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, pack_pretraining=pack_pretraining,
                  vocab_size=vocab_size, shots=shots, eval_examples=eval_examples,
                  humaneval_examples=humaneval_examples,
                  humaneval_lengths=dict(humaneval_lengths or {'inputs': 640, 'targets': 128}),
                  eval_batch_size=eval_batch_size,
                  perplexity_batch_size=perplexity_batch_size,
                  perplexity_batches=perplexity_batches, log_every=log_every,
                  models=models, anchor_checkpoint=anchor_checkpoint,
                  config_text=config_text)
  return experiment_runs.run_seeds(
      functools.partial(_run_one, **settings), root, seed=seed, seeds=seeds,
      metrics=list(METRICS), models=models, write_results=write_results)


def _run_one(root: epath.Path, *, seed: int, m_a_config: TransformerConfig,
             m_b_config: TransformerConfig, bridge: BridgeConfig,
             task_feature_lengths: Mapping[str, int], m_a_steps: int, m_b_steps: int,
             compose_steps: int, finetune_steps: int, lora_steps: int, batch_size: int,
             learning_rate: float, compose_learning_rate: float,
             finetune_learning_rate: float, lora_learning_rate: float, weight_decay: float,
             warmup_steps: int, pack_pretraining: bool, vocab_size: int, shots: int,
             eval_examples: int | None, humaneval_examples: int | None,
             humaneval_lengths: Mapping[str, int], eval_batch_size: int,
             perplexity_batch_size: int, perplexity_batches: int | None, log_every: int,
             models: Sequence[str], anchor_checkpoint: str | None,
             config_text: str | None) -> dict[str, dict[str, float]]:
  """One seed of `run_experiment`, under `root`."""
  from calm_tasks import code_data  # pylint: disable=g-import-not-at-top
  root.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  tick = time.perf_counter()
  vocabulary = anchor_checkpoint or str(root / 'vocab.model')
  if anchor_checkpoint is None:
    code.code_vocabulary(vocabulary, vocab_size)
  code.register_stdlib(vocabulary, shots=shots)  # Every stdlib task and D_C, once.
  code.register_humaneval(vocabulary)
  phase = experiment_runs.PhaseRunner(
      root, task_feature_lengths=task_feature_lengths, batch_size=batch_size, seed=seed,
      log_every=log_every, warmup_steps=warmup_steps, weight_decay=weight_decay,
      config_text=config_text)
  phase.seconds['vocabulary'] = time.perf_counter() - tick
  timings = phase.seconds
  trained = experiment_runs.train_rows(
      phase, models=models, seed=seed, m_a_config=m_a_config, m_b_config=m_b_config,
      bridge=bridge, augment_task='stdlib_code_lm', anchor_task='stdlib_en_lm',
      dc_task='stdlib_dc', m_a_steps=m_a_steps, m_b_steps=m_b_steps,
      compose_steps=compose_steps, finetune_steps=finetune_steps, lora_steps=lora_steps,
      learning_rate=learning_rate, compose_learning_rate=compose_learning_rate,
      finetune_learning_rate=finetune_learning_rate, lora_learning_rate=lora_learning_rate,
      pack_pretraining=pack_pretraining, anchor_checkpoint=anchor_checkpoint)

  results: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
  tick = time.perf_counter()
  for model in models:
    path = trained['paths'][model]
    eval_dir = root / 'eval' / model.replace(' ', '_').replace('+', 'plus')
    scores = eval_lib.evaluate(
        checkpoint=path, mixture_or_task_name='stdlib_code_to_text',
        task_feature_lengths=task_feature_lengths, batch_size=eval_batch_size,
        eval_dir=str(eval_dir), num_examples=eval_examples)['stdlib_code_to_text']
    results['chrf'][model], results['bleu'][model] = scores['chrf'], scores['bleu']
    results['humaneval'][model] = eval_lib.evaluate(
        checkpoint=path, mixture_or_task_name='humaneval',
        task_feature_lengths=humaneval_lengths, batch_size=eval_batch_size,
        eval_dir=str(eval_dir), num_examples=humaneval_examples)['humaneval']['pass@1']
    for metric, task in (('en_ppl', 'stdlib_en_lm'), ('code_ppl', 'stdlib_code_lm')):
      results[metric][model] = experiment_runs.perplexity(
          path, task_feature_lengths, perplexity_batch_size, task, perplexity_batches)
    logging.info('%s: %s', model, json.dumps({k: v[model] for k, v in results.items()}))
  timings['eval'] = time.perf_counter() - tick
  timings['total'] = time.perf_counter() - start
  settings = {'seed': seed, 'seconds': timings, 'python': code_data.python_version(),
              'lora_rank': trained['lora_rank'],
              'bridge_parameters': trained['bridge_parameters'],
              'lora_parameters': trained['lora_parameters'],
              'steps': {'m_a': m_a_steps, 'm_b': m_b_steps, 'compose': compose_steps,
                        'finetune': finetune_steps, 'lora': lora_steps},
              'pairs': {'dc': len(code.dc_pairs()), 'train': len(code_data.code_text(False)),
                        'held_out': len(code_data.code_text(True))},
              'shots': shots, 'batch_size': batch_size, 'rates': dict(code.DC_RATES),
              'anchor_checkpoint': anchor_checkpoint, 'perplexity_batches': perplexity_batches,
              'connections': bridge.connections or f'every {bridge.every}'}
  write_results(results, root, settings)
  logging.info('results in %s (%.0f s): %s', root, timings['total'], json.dumps(results))
  return results


def main():
  """`python -m calm_tasks.code_experiment`: `calm_jax.cli.code_experiment.main`."""
  from calm_jax.cli import code_experiment as cli  # pylint: disable=g-import-not-at-top
  cli.main()


if __name__ == '__main__':
  main()
