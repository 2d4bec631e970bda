"""The low-resource-language experiment (CALM section 4.2, Tables 2 and 5) on the Bibles, on a CPU.

  calm-lowres-experiment --gin_file=experiments/lowres_bible.gin \
      --gin.EXPERIMENT_DIR="'/tmp/calm_lowres'"

Data (`calm_tasks.lowres`, `bible_data`): Chichewa and English verses of the training books;
D_C is 5 % of their parallel verses as nya->en translation (mixed with English LM, `bible_dc`);
every row is evaluated on the four held-out books only. Phases, each a calm-train run under
EXPERIMENT_DIR (a rerun resumes or skips finished phases):
  vocab.model       one SentencePiece vocabulary for both languages (training books only)
  m_a/              pretrain m_A (augment) on Chichewa                       (bible_nya_lm)
  m_b/              pretrain m_B (anchor) on English and a 1 % slice of pairs (bible_anchor)
  calm/             compose m_B + m_A, bridges trained on D_C                     (bible_dc)
  m_b_dc/           m_B fully fine-tuned on D_C (the paper's "m_B + NTL" row)
  lora/             LoRA on m_B, trained on D_C, its rank chosen so that it trains as many
                    parameters as the bridges (the paper's Table 5 rule)
  calm_random_m_a/  the composition with an untrained m_A
  calm_encoder/     the composition with m_A as an encoder of the prompt only
then every model is scored on nya->en of the held-out books (greedy decoding; chrF1 and BLEU,
sacrebleu) and on their English LM perplexity (the anchor's own skill must survive). Writes
results.json, results.md (the layout of Tables 2 and 5 with the paper's numbers beside ours,
and each phase's wall time) and results.png. With `seeds` it runs once per seed under
EXPERIMENT_DIR/seed_<n>/ and reports the mean and spread of every cell.

With a real anchor (`anchor_checkpoint`, e.g. `calm-convert`'s Gemma 3 270M,
gin/experiments/lowres_bible_gemma3.gin): m_B is that checkpoint, not pretrained here; every
model uses its vocabulary instead of vocab.model (m_A is trained in it); `models` picks the rows
that are run (a real anchor's full fine-tuning costs hours on a CPU).
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
from calm_tasks import experiment_runs, lowres

MODELS = experiment_runs.ROW_PATHS
# With augment_vocab_size: m_A's tasks in its own vocabulary, and the compositions' (both
# streams).
AUGMENT_PREFIX = 'augment_'
ALIGNED_PREFIX = 'aligned_'

COLORS = {'m_A': '#888', 'm_B': '#888', 'calm': '#1f77b4', 'm_B + D_C': '#ff7f0e',
          'lora': '#2ca02c', 'calm_random_m_A': '#bbb', 'calm_encoder': '#bbb'}
METRICS = {'chrf': 'nya->en chrF1', 'bleu': 'nya->en BLEU', 'en_ppl': 'English perplexity'}
# Table 2 (FLORES-200 XX->En, 5-shot chrF1, average of the 10 languages shown).
PAPER = {'chrf': {'m_A': 37.2, 'm_B': 41.7, 'calm': 46.1, 'm_B + D_C': 48.2}}
# Table 5: FLORES-200 languages (of 192) on which the variant beats m_B.
PAPER_IMPROVED = {'calm': 175, 'calm_random_m_A': 43, 'lora': '82 or 102',
                  'calm_encoder': '102 or 82'}


def perplexity(checkpoint: str, task_feature_lengths: Mapping[str, int], batch_size: int,
               task: str = 'bible_en_lm') -> float:
  """exp(mean token cross-entropy) of `checkpoint` on every full batch of `task`'s validation
  split (teacher-forced)."""
  return experiment_runs.perplexity(checkpoint, task_feature_lengths, batch_size, task)


def write_results(results: Mapping[str, Mapping[str, float]], out_dir: epath.Path,
                  settings: Mapping[str, Any], spread: Mapping[str, Any] | None = None) -> None:
  """results.json, results.md (with the paper's numbers) and results.png.

  Args:
    results: {metric: {model: value}} (the mean over seeds where there are several).
    out_dir: where to write.
    settings: recorded in results.json; its 'seconds' go into results.md.
    spread: for several seeds: 'seeds', 'std', 'min', 'max' ({metric: {model: value}}).
  """
  record = {'results': results, 'settings': settings, 'paper_chrf': PAPER['chrf'],
            'paper_languages_improved': PAPER_IMPROVED}
  if spread is not None:
    record.update(spread)
  (out_dir / 'results.json').write_text(json.dumps(record, indent=2))

  def cell(metric, model):
    value = results[metric][model]
    text = f'{value:.2f}' if metric == 'en_ppl' else f'{value:.1f}'
    if spread is not None:
      text += (f' ± {spread["std"][metric][model]:.1f} '
               f'({spread["min"][metric][model]:.1f}-{spread["max"][metric][model]:.1f})')
    return text

  lines = ['| model | nya->en chrF1 (ours) | paper chrF1 (FLORES avg) | nya->en BLEU | English '
           'ppl | paper: languages improved over m_B |', '|---|---|---|---|---|---|']
  for model in [m for m in MODELS if m in results['chrf']]:
    lines.append(f'| {model} | {cell("chrf", model)} | {PAPER["chrf"].get(model, "-")} | '
                 f'{cell("bleu", model)} | {cell("en_ppl", model)} | '
                 f'{PAPER_IMPROVED.get(model, "-")} |')
  notes = ['Evaluated on the held-out books (Ruth, Jonah, Philippians, James: 345 parallel '
           'verses), never seen in training in either language. chrF with beta 1 (chrF1) and '
           'BLEU from sacrebleu on each translation up to its first newline; perplexity per '
           'token (of the shared vocabulary) of the English verses.']
  if settings.get('anchor_checkpoint'):
    notes.append(f'm_B: the pretrained {settings["anchor_checkpoint"]}, in its vocabulary.')
  if settings.get('augment_vocab_size'):
    notes.append(f'm_A reads its own Chichewa SentencePiece vocabulary '
                 f'({settings["augment_vocab_size"]} pieces, augment_vocab.model); the '
                 'compositions read each text in both tokenizations (own_tokenizer). m_A\'s '
                 'perplexity is per token of its own vocabulary.')
  if spread is not None:
    notes.append(f'Seeds {list(spread["seeds"])}: mean ± sample standard deviation (min-max).')
  if settings.get('seconds'):
    notes.append('Wall time per phase: ' + ', '.join(
        f'{k} {v:.0f} s' for k, v in settings['seconds'].items()) + '.')
  (out_dir / 'results.md').write_text('\n'.join(lines) + '\n\n' + '\n\n'.join(notes) + '\n')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  names = [m for m in MODELS if m in results['chrf']]
  for ax, metric in zip(axes, ('chrf', 'en_ppl')):
    values = [results[metric][m] for m in names]
    errors = None
    if spread is not None:
      errors = [[v - spread['min'][metric][m] for m, v in zip(names, values)],
                [spread['max'][metric][m] - v for m, v in zip(names, values)]]
    bars = ax.bar(range(len(names)), values, yerr=errors, capsize=2,
                  color=[COLORS[m] for m in names])
    ax.bar_label(bars, fmt='%.1f', fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    if metric == 'en_ppl':  # m_A, trained on Chichewa, reads English orders of magnitude worse.
      ax.set_yscale('log')
    ax.set_title(METRICS[metric] + (' (held-out books)' if metric == 'chrf' else
                                    ' (held-out books, log scale, lower is better)'), fontsize=9)
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
                   pack_pretraining: bool = True, vocab_size: int = lowres.VOCAB_SIZE,
                   shots: int = 0,
                   eval_examples: int | None = None, eval_batch_size: int = 64,
                   perplexity_batch_size: int = 23, seed: int = 0,
                   seeds: Sequence[int] | None = None, log_every: int = 100,
                   anchor_checkpoint: str | None = None,
                   models: Sequence[str] | None = None,
                   augment_vocab_size: int | None = None,
                   config_text: str | None = None) -> dict[str, dict[str, float]]:
  """Runs every phase (module docstring); returns {metric: {model: value}}.

  Args:
    experiment_dir: EXPERIMENT_DIR, where every run and the results go.
    m_a_config, m_b_config: the augment's and the anchor's architectures (vocab_size must be
      `vocab_size`, or the anchor checkpoint's; m_b_config is ignored with
      `anchor_checkpoint`).
    bridge: the bridges' configuration.
    task_feature_lengths: {'inputs': ..., 'targets': ...} of every phase and evaluation.
    m_a_steps, m_b_steps, compose_steps: training steps of pretraining and of each
      composition; finetune_steps, lora_steps: of the D_C baselines (default compose_steps).
    batch_size: training batch of every phase.
    learning_rate: AdamW peak rate of pretraining (cosine).
    compose_learning_rate, finetune_learning_rate, lora_learning_rate: of the D_C phases.
    weight_decay: AdamW's decoupled weight decay.
    warmup_steps: linear warmup of every phase.
    pack_pretraining: pack several verses per row when pretraining m_A and m_B (verses are
      short: unpacked, most of a row is padding).
    vocab_size: pieces of the SentencePiece vocabulary trained at EXPERIMENT_DIR/vocab.model.
    shots: k of the nya->en prompts (training and evaluation).
    eval_examples: translate this many held-out verses (default all 345).
    eval_batch_size: decoding batch.
    perplexity_batch_size: teacher-forced batch (23 x 15 = the 345 held-out English verses).
    seed: seed of every phase.
    seeds: run once per seed under EXPERIMENT_DIR/seed_<n>/ and report mean and spread.
    log_every: steps between progress lines.
    anchor_checkpoint: a pretrained LM checkpoint to use as m_B (its architecture and
      vocabulary; m_B is not pretrained and vocab_size is unused).
    models: the rows to run and evaluate, of MODELS (default all); the phases they need run.
    augment_vocab_size: give m_A a SentencePiece vocabulary of its own, of this many pieces,
      trained on the training books' Chichewa (EXPERIMENT_DIR/augment_vocab.model): m_A
      pretrains in it and the compositions read each text in both tokenizations
      (`lowres.register_bible_aligned`); m_a_config.vocab_size must be this.
    config_text: the resolved configuration (the command line passes gin's).

  Raises:
    ValueError: a vocabulary size that does not match, or an unknown model in `models`.
  """
  root = epath.Path(experiment_dir)
  root.mkdir(parents=True, exist_ok=True)
  if config_text is not None:
    (root / train_lib.CONFIG_FILE).write_text(config_text)
  if anchor_checkpoint is not None:
    m_b_config = checkpoints.load_lm_config(anchor_checkpoint)
    vocab_size = m_b_config.vocab_size
  elif m_b_config is None:
    raise ValueError('Give m_b_config (the anchor to pretrain) or anchor_checkpoint.')
  for name, config, size in (('m_a_config', m_a_config, augment_vocab_size or vocab_size),
                             ('m_b_config', m_b_config, vocab_size)):
    if config.vocab_size != size:
      raise ValueError(f'{name}.vocab_size is {config.vocab_size}, but its vocabulary has '
                       f'{size} pieces.')
  models = list(models or MODELS)
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise ValueError(f'Unknown models {unknown}; known: {list(MODELS)}.')
  models = [m for m in MODELS if m in models]
  settings = dict(m_a_config=m_a_config, m_b_config=m_b_config, bridge=bridge,
                  task_feature_lengths=dict(task_feature_lengths), m_a_steps=m_a_steps,
                  m_b_steps=m_b_steps, compose_steps=compose_steps,
                  finetune_steps=finetune_steps or compose_steps,
                  lora_steps=lora_steps or compose_steps, batch_size=batch_size,
                  learning_rate=learning_rate, compose_learning_rate=compose_learning_rate,
                  finetune_learning_rate=finetune_learning_rate,
                  lora_learning_rate=lora_learning_rate, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, pack_pretraining=pack_pretraining,
                  vocab_size=vocab_size, shots=shots,
                  eval_examples=eval_examples, eval_batch_size=eval_batch_size,
                  perplexity_batch_size=perplexity_batch_size, log_every=log_every,
                  anchor_checkpoint=anchor_checkpoint, models=models,
                  augment_vocab_size=augment_vocab_size, config_text=config_text)
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
             eval_examples: int | None,
             eval_batch_size: int, perplexity_batch_size: int, log_every: int,
             anchor_checkpoint: str | None, models: Sequence[str],
             augment_vocab_size: int | None,
             config_text: str | None) -> dict[str, dict[str, float]]:
  """One seed of `run_experiment`, under `root`."""
  root.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  timings: dict[str, float] = {}
  tick = time.perf_counter()
  vocabulary = anchor_checkpoint or str(root / 'vocab.model')
  lowres.bible_vocabulary(vocabulary, vocab_size)
  lowres.register_bible(vocabulary, shots=shots)  # Every Bible task and mixture, once.
  augment_vocabulary, own = None, {}
  if augment_vocab_size is not None:
    augment_vocabulary = str(root / 'augment_vocab.model')
    lowres.bible_vocabulary(augment_vocabulary, augment_vocab_size, languages=('nya',))
    lowres.register_bible(augment_vocabulary, shots=shots, prefix=AUGMENT_PREFIX)
    own = {'compose_task': lowres.register_bible_aligned(
        vocabulary, augment_vocabulary, shots=shots, prefix=ALIGNED_PREFIX),
        'augment_vocabulary': augment_vocabulary}
  timings['vocabulary'] = time.perf_counter() - tick

  phase = experiment_runs.PhaseRunner(
      root, task_feature_lengths=task_feature_lengths, batch_size=batch_size, seed=seed,
      log_every=log_every, warmup_steps=warmup_steps, weight_decay=weight_decay,
      config_text=config_text)
  phase.seconds.update(timings)
  timings = phase.seconds

  trained = experiment_runs.train_rows(
      phase, models=models, seed=seed, m_a_config=m_a_config, m_b_config=m_b_config,
      bridge=bridge, augment_task=('bible_nya_lm' if augment_vocabulary is None
                                   else AUGMENT_PREFIX + 'bible_nya_lm'),
      anchor_task='bible_anchor',
      dc_task='bible_dc', m_a_steps=m_a_steps, m_b_steps=m_b_steps,
      compose_steps=compose_steps, finetune_steps=finetune_steps, lora_steps=lora_steps,
      learning_rate=learning_rate, compose_learning_rate=compose_learning_rate,
      finetune_learning_rate=finetune_learning_rate, lora_learning_rate=lora_learning_rate,
      pack_pretraining=pack_pretraining, anchor_checkpoint=anchor_checkpoint, **own)
  paths = trained['paths']

  results: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
  tick = time.perf_counter()
  for model in models:
    path = paths[model]
    prefix = ''  # The tasks each row reads: its own vocabulary, or both streams.
    if augment_vocabulary is not None and model == 'm_A':
      prefix = AUGMENT_PREFIX
    elif augment_vocabulary is not None and model in ('calm', 'calm_random_m_A', 'calm_encoder'):
      prefix = ALIGNED_PREFIX
    translation = prefix + 'bible_nya_en'
    metrics = eval_lib.evaluate(
        checkpoint=path, mixture_or_task_name=translation,
        task_feature_lengths=task_feature_lengths, batch_size=eval_batch_size,
        eval_dir=str(root / 'eval' / model.replace(' ', '_').replace('+', 'plus')),
        num_examples=eval_examples)[translation]
    results['chrf'][model], results['bleu'][model] = metrics['chrf'], metrics['bleu']
    results['en_ppl'][model] = perplexity(path, task_feature_lengths, perplexity_batch_size,
                                          prefix + 'bible_en_lm')
    logging.info('%s: chrF1 %.1f, BLEU %.1f, English ppl %.2f', model,
                 results['chrf'][model], results['bleu'][model], results['en_ppl'][model])
  timings['eval'] = time.perf_counter() - tick
  timings['total'] = time.perf_counter() - start
  splits = lowres.bible_splits()
  settings = {'seed': seed, 'seconds': timings, 'lora_rank': trained['lora_rank'],
              'bridge_parameters': trained['bridge_parameters'],
              'lora_parameters': trained['lora_parameters'],
              'steps': {'m_a': m_a_steps, 'm_b': m_b_steps, 'compose': compose_steps,
                        'finetune': finetune_steps, 'lora': lora_steps},
              'pairs': {k: len(v) for k, v in splits.items()}, 'shots': shots,
              'batch_size': batch_size, 'anchor_checkpoint': anchor_checkpoint,
              'augment_vocab_size': augment_vocab_size,
              'connections': bridge.connections or f'every {bridge.every}',
              'rates': {m: lowres.mixture_rates(m) for m in ('bible_anchor', 'bible_dc')}}
  write_results(results, root, settings)
  logging.info('results in %s (%.0f s): %s', root, timings['total'], json.dumps(results))
  return results


def main():
  """`python -m calm_tasks.lowres_experiment`: `calm_jax.cli.lowres_experiment.main`."""
  from calm_jax.cli import lowres_experiment as cli  # pylint: disable=g-import-not-at-top
  cli.main()


if __name__ == '__main__':
  main()
