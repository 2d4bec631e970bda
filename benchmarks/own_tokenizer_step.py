"""Cost of a composition step whose augment has its own tokenizer, against a shared one.

The same anchor, augment and bridges (`common.MODELS`), the same batch and lengths; only the
augment's stream differs. Shared: the augment reads the anchor's tokens (today's causal cross
mask). Own: the augment reads a tokenization of its own, as long as the anchor's, whose token
spans differ (byte lengths 1-6 drawn for each stream); the bridges' mask comes from both
streams' read keys (`masks.aligned_cross_mask`). Each step is jitted once and timed (median of
`runs` after a warm-up), with XLA's FLOP count; JSON with both rows and their ratio.

  python benchmarks/own_tokenizer_step.py [--size=toy|small] [--output=PATH]
"""

from __future__ import annotations

import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as step_benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import alignment, flops, optim
from calm_jax import calm as calm_lib
from calm_jax.calm import Calm
from calm_jax.random_init import random_like
from calm_jax.train_step import apply_fn_for, init_train_state, make_train_step


def _keys(rng: np.random.Generator, batch: int, length: int, total: int) -> np.ndarray:
  """[batch, length] decoder read keys of streams whose tokens span 1-6 bytes each, scaled so
  that each row's last token ends at byte `total` (both streams read the same text)."""
  rows = []
  for _ in range(batch):
    ends = np.cumsum(rng.integers(1, 7, size=length))
    ends = np.maximum(1, np.round(ends * total / ends[-1])).astype(np.int64)
    ends = np.maximum.accumulate(ends)
    rows.append(alignment.decoder_read_keys(alignment.read_keys(ends)))
  return np.stack(rows).astype(np.int32)


def features(config, batch: int, length: int, own: bool) -> dict[str, jax.Array]:
  """A batch of LM features; with `own`, the augment stream and both streams' read keys."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, config.anchor.vocab_size, (batch, length)), jnp.int32)
  out = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens,
         'decoder_loss_weights': jnp.ones((batch, length), jnp.float32)}
  if own:
    total = 4 * length
    augment = dict(config.augments)['augment']
    out.update({
        'decoder_read_keys': jnp.asarray(_keys(rng, batch, length, total)),
        'augment_input_tokens': jnp.asarray(
            rng.integers(1, augment.vocab_size, (batch, length)), jnp.int32),
        'augment_read_keys': jnp.asarray(_keys(rng, batch, length, total)),
        'augment_segment_ids': jnp.ones((batch, length), jnp.int32),
        'augment_causal_attention': jnp.zeros((batch, length), jnp.int32)})
  return out


def run(size: str) -> dict:
  """Times both steps at `size`; returns the JSON-ready report."""
  shared_config, batch, length, runs = step_benchmark.build(size)
  own_config = dataclasses.replace(shared_config, own_tokenizer=('augment',))
  abstract = nn.unbox(calm_lib.abstract_params(shared_config))
  frozen = jax.tree.map(jnp.asarray, random_like(
      {'anchor': abstract['anchor'], 'augments': abstract['augments']}))
  bridges = calm_lib.init_bridge_params(shared_config, jax.random.key(0))
  optimizer, _ = optim.make_optimizer('adamw', learning_rate=1e-4)
  analytic = flops.composition_step_flops(shared_config, batch, length)
  report = {'size': size, 'batch': batch, 'length': length, 'runs': runs,
            **common.report_header(shared_config, frozen, bridges), 'programs': {}}
  for name, config in (('shared_tokenizer_step', shared_config),
                       ('own_tokenizer_step', own_config)):
    step = make_train_step(apply_fn_for(Calm(config)), optimizer)
    state = init_train_state(jax.tree.map(jnp.copy, bridges), optimizer)
    measured = step_benchmark.measure(
        step, (state, frozen, features(config, batch, length, bool(config.own_tokenizer))),
        runs, donate_first=True)
    report['programs'][name] = {'analytic_flops': analytic, **measured}
  p = report['programs']
  report['ratios'] = {f'own/shared ({key})': p['own_tokenizer_step'][key] /
                      p['shared_tokenizer_step'][key] for key in ('xla_flops', 'median_s')}
  return report


def main(argv=None) -> None:
  """Command line: runs one size and writes its JSON report."""
  args = common.parse_args(__doc__, sorted(step_benchmark.SIZES), 'own_tokenizer_step', argv)
  report = run(args.size)
  output = common.write_report(report, args.output, 'own_tokenizer_step', args.size)
  for name, row in report['programs'].items():
    print(f'{name:<22} xla {row["xla_flops"]:.3e}  median {row["median_s"] * 1e3:9.1f} ms',
          file=sys.stderr)
  for name, value in report['ratios'].items():
    print(f'{name:<30} {value:6.3f}', file=sys.stderr)
  print(f'wrote {output}', file=sys.stderr)


if __name__ == '__main__':
  main()
