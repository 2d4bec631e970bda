"""Optimizers through optax: AdamW or Adafactor, warmup + decay schedules, gradient clipping."""

from __future__ import annotations

import optax

DECAYS = ('constant', 'cosine', 'linear', 'rsqrt')
OPTIMIZERS = ('adamw', 'adafactor')


def make_schedule(learning_rate: float, warmup_steps: int = 0, decay: str = 'cosine',
                  total_steps: int = 1000, end_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then `decay` to `end_fraction * learning_rate`.

  Args:
    learning_rate: peak learning rate.
    warmup_steps: steps of linear warmup.
    decay: 'constant', 'cosine' or 'linear' (to `end_fraction` at `total_steps`), or 'rsqrt'
      (learning_rate * sqrt(warmup / step), T5's inverse square root; needs warmup_steps > 0).
    total_steps: length of the run.
    end_fraction: final learning rate as a fraction of the peak (cosine, linear).
  """
  if decay not in DECAYS:
    raise ValueError(f'Unknown decay {decay!r}; choose from {DECAYS}.')
  decay_steps = max(total_steps - warmup_steps, 1)
  end = learning_rate * end_fraction
  if decay == 'constant':
    after = optax.constant_schedule(learning_rate)
  elif decay == 'cosine':
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_fraction)
  elif decay == 'linear':
    after = optax.linear_schedule(learning_rate, end, decay_steps)
  else:
    if warmup_steps <= 0:
      raise ValueError('The rsqrt decay needs warmup_steps > 0.')
    after = lambda step: learning_rate * (warmup_steps / (step + warmup_steps)) ** 0.5
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(name: str = 'adamw', learning_rate: float = 1e-3, warmup_steps: int = 0,
                   decay: str = 'cosine', total_steps: int = 1000, end_fraction: float = 0.0,
                   weight_decay: float = 0.0, clip_norm: float | None = 1.0, b1: float = 0.9,
                   b2: float = 0.999) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds (optimizer, learning-rate schedule).

  Args:
    name: 'adamw' or 'adafactor' (factored second moments, T5X's default).
    learning_rate, warmup_steps, decay, total_steps, end_fraction: see `make_schedule`.
    weight_decay: decoupled weight decay (AdamW) or Adafactor's weight_decay_rate.
    clip_norm: clip the gradients' global norm to this value first; None disables.
    b1, b2: Adam's moment decays.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; choose from {OPTIMIZERS}.')
  schedule = make_schedule(learning_rate, warmup_steps, decay, total_steps, end_fraction)
  if name == 'adamw':
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
  else:
    tx = optax.adafactor(schedule, weight_decay_rate=weight_decay or None,
                         multiply_by_parameter_scale=False)
  if clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx, schedule
