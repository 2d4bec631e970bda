"""What the experiments share: a phase is one calm-train run, and seeds are summarised alike.

`PhaseRunner` trains each phase of an experiment under its root with the same feature lengths,
batch, seed, schedule (AdamW, linear warmup, cosine decay) and resolved configuration, and
records its wall time; `train_rows` trains the models of the rows the domain experiments
share (m_A, m_B, CALM, m_B on D_C, LoRA of the bridges' size, CALM with a random m_A, CALM with
m_A as an encoder); `perplexity` scores a checkpoint teacher-forced; `seed_statistics` gives
the mean, sample standard deviation, min and max over seeds of every {key: {model: value}}
cell.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np

from calm_jax import calm as calm_lib
from calm_jax import lora, optim, partitioning, random_init, runs, trainable
from calm_jax import train as train_lib
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.train_eval import TrainEvaluator

# Each row's checkpoint, relative to a seed's directory (m_B's is the anchor checkpoint where
# one is given).
ROW_PATHS = {'m_A': 'm_a/lm', 'm_B': 'm_b/lm', 'calm': 'calm', 'm_B + D_C': 'm_b_dc/lm',
             'lora': 'lora/lm', 'calm_random_m_A': 'calm_random_m_a',
             'calm_encoder': 'calm_encoder'}


class PhaseRunner:
  """Runs the phases of one seed of an experiment (calm-train runs under `root`).

  Args:
    root: the seed's directory; phase `name` trains in `root / name`.
    task_feature_lengths, batch_size, seed, log_every, warmup_steps, weight_decay,
      config_text: as `calm_jax.train.train` takes them, for every phase.
  """

  def __init__(self, root: epath.Path, *, task_feature_lengths: Mapping[str, int],
               batch_size: int, seed: int, log_every: int, warmup_steps: int,
               weight_decay: float, config_text: str | None):
    self.root = root
    self.seconds: dict[str, float] = {}
    self._common = dict(task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                        seed=seed, log_every=log_every, save_every=1000,
                        config_text=config_text)
    self._schedule = dict(warmup_steps=warmup_steps, decay='cosine', weight_decay=weight_decay)

  def __call__(self, name: str, *, learning_rate: float, **kwargs: Any) -> None:
    """Trains phase `name` (a finished one resumes and stops at once) at peak rate
    `learning_rate`; `kwargs` go to `calm_jax.train.train` (mode, task, models, steps)."""
    tick = time.perf_counter()
    logging.info('=== %s ===', name)
    train_lib.train(
        model_dir=str(self.root / name),
        optimizer_fn=functools.partial(optim.make_optimizer, learning_rate=learning_rate,
                                       **self._schedule),
        **self._common, **kwargs)
    self.seconds[name] = time.perf_counter() - tick


def seed_statistics(per_seed: Sequence[Mapping[str, Mapping[str, float]]],
                    keys: Sequence[str], models: Sequence[str]) -> dict[str, Any]:
  """{'mean' | 'std' | 'min' | 'max': {key: {model: value}}} over `per_seed` results (the
  standard deviation is the sample one, 0 for a single seed)."""
  out: dict[str, Any] = {stat: {key: {} for key in keys} for stat in ('mean', 'std', 'min',
                                                                      'max')}
  for key in keys:
    for model in models:
      values = np.array([r[key][model] for r in per_seed], np.float64)
      out['mean'][key][model] = float(values.mean())
      out['std'][key][model] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      out['min'][key][model] = float(values.min())
      out['max'][key][model] = float(values.max())
  return out


def bridge_count(anchor: TransformerConfig, augment: TransformerConfig,
                 bridge: BridgeConfig) -> int:
  """The composition's trained parameter count (its bridges; an augment of another vocabulary
  reads its own tokenization, which changes no bridge shape)."""
  own = ('augment',) if augment.vocab_size != anchor.vocab_size else ()
  config = CalmConfig(anchor=anchor, augments={'augment': augment},
                      bridges={'augment': bridge}, own_tokenizer=own)
  return trainable.count_params(calm_lib.abstract_params(config)['bridge'])


def perplexity(checkpoint: str, task_feature_lengths: Mapping[str, int], batch_size: int,
               task: str, max_batches: int | None = None) -> float:
  """exp(mean token cross-entropy) of `checkpoint` on every full batch of `task`'s validation
  split (teacher-forced), or on its first `max_batches` of them."""
  loaded = runs.load_checkpoint(checkpoint)
  mesh = partitioning.make_mesh()
  replicated = partitioning.replicated(mesh)
  evaluator = TrainEvaluator(loaded.model, task, task_feature_lengths, batch_size,
                             max_batches or 10_000,
                             'validation', mesh, partitioning.STANDARD_RULES, replicated,
                             replicated)
  return float(math.exp(evaluator(loaded.params, {})[task]['loss']))


def train_rows(phase: PhaseRunner, *, models: Sequence[str], seed: int,
               m_a_config: TransformerConfig, m_b_config: TransformerConfig,
               bridge: BridgeConfig, augment_task: str, anchor_task: str, dc_task: str,
               m_a_steps: int, m_b_steps: int, compose_steps: int, finetune_steps: int,
               lora_steps: int, learning_rate: float, compose_learning_rate: float,
               finetune_learning_rate: float, lora_learning_rate: float,
               pack_pretraining: bool, anchor_checkpoint: str | None = None,
               compose_task: str | None = None, augment_vocabulary: str | None = None
               ) -> dict[str, Any]:
  """Trains what the rows `models` (of ROW_PATHS) need, each phase under `phase.root`.

  m_A pretrains on `augment_task`, m_B on `anchor_task` (unless `anchor_checkpoint` is m_B);
  the compositions train on `compose_task` (default `dc_task`), m_B's full fine-tuning and
  LoRA on `dc_task`; LoRA's rank is the one whose adapter count comes closest to the
  bridges'. With `augment_vocabulary` (m_A's own vocabulary) the compositions' augment reads
  its own tokenization (`compose_task` must yield that stream). Returns {'paths': {row:
  checkpoint}, 'lora_rank', 'bridge_parameters', 'lora_parameters'}.
  """
  root = phase.root
  paths = {model: str(root / path) for model, path in ROW_PATHS.items()}
  anchor = anchor_checkpoint or paths['m_B']
  paths['m_B'] = anchor
  if {'m_A', 'calm', 'calm_encoder'} & set(models):
    phase('m_a', mode='pretrain', mixture_or_task_name=augment_task, model_config=m_a_config,
          train_steps=m_a_steps, learning_rate=learning_rate, pack=pack_pretraining)
  if anchor_checkpoint is None and set(models) - {'m_A'}:
    phase('m_b', mode='pretrain', mixture_or_task_name=anchor_task, model_config=m_b_config,
          train_steps=m_b_steps, learning_rate=learning_rate, pack=pack_pretraining)
  compose = dict(mode='compose', mixture_or_task_name=compose_task or dc_task,
                 anchor_checkpoint=anchor, bridges={'augment': bridge},
                 train_steps=compose_steps, learning_rate=compose_learning_rate)
  if augment_vocabulary is not None:
    compose.update(augment_vocabularies={'augment': augment_vocabulary})
  if 'calm' in models:
    phase('calm', augment_checkpoints={'augment': paths['m_A']}, **compose)
  if 'm_B + D_C' in models:
    phase('m_b_dc', mode='finetune', mixture_or_task_name=dc_task, anchor_checkpoint=anchor,
          train_steps=finetune_steps, learning_rate=finetune_learning_rate)
  budget = bridge_count(m_b_config, m_a_config, bridge)
  rank = lora.rank_for_budget(m_b_config, budget)
  if 'lora' in models:
    phase('lora', mode='lora', lora=lora.LoRAConfig(rank), mixture_or_task_name=dc_task,
          anchor_checkpoint=anchor, train_steps=lora_steps, learning_rate=lora_learning_rate)
  if 'calm_random_m_A' in models:
    random_m_a = random_init.random_lm_checkpoint(m_a_config, root / 'm_a_random', seed + 1)
    phase('calm_random_m_a', augment_checkpoints={'augment': random_m_a}, **compose)
  if 'calm_encoder' in models:
    phase('calm_encoder', augment_checkpoints={'augment': paths['m_A']},
          augment_as_encoder=True, **compose)
  return {'paths': paths, 'lora_rank': rank, 'bridge_parameters': budget,
          'lora_parameters': lora.adapter_count(m_b_config, lora.LoRAConfig(rank))}


def run_seeds(run_one: Callable[..., dict[str, dict[str, float]]], root: epath.Path, *,
              seed: int, seeds: Sequence[int] | None, metrics: Sequence[str],
              models: Sequence[str], write_results: Callable[..., None]
              ) -> dict[str, dict[str, float]]:
  """`run_one(root, seed=seed)` once, or once per seed under root/seed_<n>/; with seeds, writes
  the mean and spread (`write_results(mean, root, settings, spread=...)`) and returns the mean."""
  if not seeds:
    return run_one(root, seed=seed)
  seeds = [int(n) for n in seeds]
  per_seed = [run_one(root / f'seed_{n}', seed=n) for n in seeds]
  stats = seed_statistics(per_seed, metrics, models)
  spread = dict(seeds=seeds, per_seed={str(n): r for n, r in zip(seeds, per_seed)},
                std=stats['std'], min=stats['min'], max=stats['max'])
  write_results(stats['mean'], root, {'seeds': seeds}, spread=spread)
  return stats['mean']
