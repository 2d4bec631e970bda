"""Cost of composition training: analytic FLOPs, XLA's FLOPs and wall time of five programs.

Programs, all jitted once: the anchor's forward, the composed forward, the composition step
(bridges trained, frozen models a separate argument), a full fine-tuning step of the anchor,
and, for contrast, a composition step done the naive way (gradient of the whole tree, frozen
leaves masked out of the optimizer, global gradient norm logged). Writes JSON with, per
program, analytic FLOPs (calm_jax.flops), XLA cost_analysis FLOPs and the median wall time,
plus the ratios step / anchor forward, step / full fine-tune and XLA / analytic.

  python benchmarks/train_step.py [--size=toy|small] [--output=PATH]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import calm as calm_lib
from calm_jax import flops, optim, trainable
from calm_jax.calm import Calm
from calm_jax.configs import CalmConfig
from calm_jax.random_init import random_like
from calm_jax.train_step import apply_fn_for, init_train_state, make_train_step
from calm_jax.transformer import Transformer

# Batch, length and timed runs per model size of `common.MODELS`.
SIZES = {
    'toy': dict(batch=4, length=256, runs=5),  # About a minute on 2 CPU cores.
    'small': dict(batch=2, length=64, runs=2),  # Seconds; what CI runs.
}


def build(size: str) -> tuple[CalmConfig, int, int, int]:
  """(config, batch, length, runs) of a named size."""
  spec = SIZES[size]
  return common.composition(size), spec['batch'], spec['length'], spec['runs']


def measure(fn, args, runs: int, donate_first: bool = False) -> dict[str, float]:
  """Compiles `fn` (a jitted function), then times `runs` calls; returns FLOPs and seconds."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(runs + 1):  # The first call is a warm-up.
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
    if donate_first:  # The state was donated: carry the new one forward.
      args = (out[0],) + tuple(args[1:])
  return {'xla_flops': common.xla_flops(compiled), 'median_s': statistics.median(times[1:]),
          'compile_s': compile_s}


def naive_step_fn(config: CalmConfig, optimizer: optax.GradientTransformation):
  """The step DESIGN.md warns about: whole-tree gradient, optimizer mask, global grad norm."""
  apply_fn = apply_fn_for(Calm(config))
  from calm_jax.losses import cross_entropy_loss  # pylint: disable=g-import-not-at-top

  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = apply_fn(p, batch)
      return cross_entropy_loss(logits, batch['decoder_target_tokens'],
                                batch['decoder_loss_weights']).loss
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)
  return jax.jit(step)


def run(size: str) -> dict:
  """Measures every program at `size`; returns the JSON-ready report."""
  config, batch, length, runs = build(size)
  abstract = nn.unbox(calm_lib.abstract_params(config))
  frozen = jax.tree.map(jnp.asarray, random_like(
      {'anchor': abstract['anchor'], 'augments': abstract['augments']}))
  bridges = calm_lib.init_bridge_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, config.anchor.vocab_size)
  features = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens,
              'decoder_loss_weights': jnp.ones((batch, length), jnp.float32)}
  optimizer, _ = optim.make_optimizer('adamw', learning_rate=1e-4)
  anchor = Transformer(config.anchor)

  programs = {}
  anchor_forward = jax.jit(lambda p, t: anchor.apply({'params': p}, t).logits)
  programs['anchor_forward'] = (measure(anchor_forward, (frozen['anchor'], tokens), runs),
                                flops.lm_forward_flops(config.anchor, batch, length))
  composed = jax.jit(lambda p, t: Calm(config).apply({'params': p}, t).logits)
  programs['composed_forward'] = (
      measure(composed, (trainable.merge_params(bridges, frozen), tokens), runs),
      flops.composed_forward_flops(config, batch, length))
  step = make_train_step(apply_fn_for(Calm(config)), optimizer)
  state = init_train_state(jax.tree.map(jnp.copy, bridges), optimizer)
  programs['composition_step'] = (
      measure(step, (state, frozen, features), runs, donate_first=True),
      flops.composition_step_flops(config, batch, length))
  full_step = make_train_step(apply_fn_for(anchor), optimizer)
  full_state = init_train_state(jax.tree.map(jnp.copy, frozen['anchor']), optimizer)
  programs['full_finetune_step'] = (
      measure(full_step, (full_state, {}, features), runs,
              donate_first=True),
      flops.full_finetune_step_flops(config.anchor, batch, length))
  masked = optax.multi_transform({'train': optimizer, 'freeze': optax.set_to_zero()},
                                 {'anchor': 'freeze', 'augments': 'freeze', 'bridge': 'train'})
  everything = trainable.merge_params(bridges, frozen)
  programs['naive_masked_step'] = (
      measure(naive_step_fn(config, masked), (everything, masked.init(everything), features),
              runs),
      flops.composition_step_flops(config, batch, length))

  report = {'size': size, 'batch': batch, 'length': length, 'runs': runs,
            **common.report_header(config, frozen, bridges), 'programs': {}}
  for name, (measured, analytic) in programs.items():
    report['programs'][name] = {'analytic_flops': analytic, **measured,
                                'xla_over_analytic': measured['xla_flops'] / analytic}
  p = report['programs']

  def ratio(a, b, key):
    return p[a][key] / p[b][key]

  report['ratios'] = {
      f'{a}/{b} ({key})': ratio(a, b, key)
      for a, b in [('composed_forward', 'anchor_forward'),
                   ('composition_step', 'anchor_forward'),
                   ('composition_step', 'full_finetune_step'),
                   ('full_finetune_step', 'anchor_forward'),
                   ('naive_masked_step', 'composition_step')]
      for key in ('analytic_flops', 'xla_flops', 'median_s')}
  return report


def main(argv=None) -> None:
  """Command line: runs one size and writes its JSON report."""
  args = common.parse_args(__doc__, sorted(SIZES), 'train_step', argv)
  report = run(args.size)
  output = common.write_report(report, args.output, 'train_step', args.size)
  for name, row in report['programs'].items():
    print(f'{name:<20} analytic {row["analytic_flops"]:.3e}  xla {row["xla_flops"]:.3e} '
          f'(x{row["xla_over_analytic"]:.3f})  median {row["median_s"] * 1e3:9.1f} ms',
          file=sys.stderr)
  for name, value in report['ratios'].items():
    print(f'{name:<60} {value:6.3f}', file=sys.stderr)
  print(f'wrote {output}', file=sys.stderr)


if __name__ == '__main__':
  main()
