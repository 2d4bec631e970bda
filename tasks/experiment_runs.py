"""What the experiments share: a phase is one calm-train run, and seeds are summarised alike.

`PhaseRunner` trains each phase of an experiment under its root with the same feature lengths,
batch, seed, schedule (AdamW, linear warmup, cosine decay) and resolved configuration, and
records its wall time; `seed_statistics` gives the mean, sample standard deviation, min and
max over seeds of every {key: {model: value}} cell.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np

from calm_jax import optim
from calm_jax import train as train_lib


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
