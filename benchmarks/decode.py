"""Cost of decoding with the composition: the KV-cached decoder of the anchor alone and composed.

For each model (the anchor `Transformer` and the composed `Calm`), batch size B and context
(prompt) length P, with cache length L = P + max_decode_len, measures:

  prefill_s        median wall time of the jitted prefill (`decoding.prefill`) of B prompts of
                   P tokens, after one warm-up call (see `median_time`);
  step_s           median wall time of ONE jitted decoding step (`decoding.extend` on tokens
                   [B, 1] with the prefill's cache, donated and carried from call to call): one
                   new token in each of the B rows;
  generate_s       median wall time of `make_generate_fn` producing max_decode_len tokens per row
                   (eos_id = -1: no row stops early), prefill included; `generate_per_token_s`
                   divides it by max_decode_len, `generate_loop_per_token_s` subtracts the
                   prefill first and divides by the max_decode_len - 1 loop steps;
  cache bytes      bytes of every cache leaf with a sequence axis / (B * L), per part (anchor,
                   augments, bridge; the composed cache's [B] `prompt_length` is left out);
  FLOPs per token  the analytic count of one decoding step per row (`flops.decode_step_flops`) and
                   XLA's cost analysis of the compiled step divided by B (a cross-check), plus
                   analytic (calm_jax.flops) and XLA FLOPs of the prefill.

Ratios composed / anchor of each of these are reported per (B, P), beside the design's
expectation that a composed decoding step costs about 1.35-1.5x the anchor's.

  python benchmarks/decode.py [--size=toy|small] [--output=PATH]
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import calm as calm_lib
from calm_jax import decoding, flops, trainable
from calm_jax.calm import Calm
from calm_jax.configs import CalmConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer

# Decoding settings per model size of `common.MODELS`: batches, prompt lengths and runs.
SIZES = {
    # About 700 CPU-seconds (14 minutes on 2 busy cores).
    'toy': dict(batches=(1, 8, 32), contexts=(128, 512), max_decode_len=32, runs=3,
                step_runs=10, budget_s=10.0, compiler_options={}),
    # What CI runs: about 150 CPU-seconds, most of them compiling its 36 programs. XLA's default
    # CPU backend optimisation would compile 2.5x longer; it uses the cheapest level instead
    # (same HLO and FLOP counts, slower kernels: its times are only indicative).
    'small': dict(batches=(1, 8, 32), contexts=(16, 32), max_decode_len=8, runs=1, step_runs=3,
                  budget_s=0.5, compiler_options={'xla_backend_optimization_level': 0}),
}

# The design's expectation: a composed decoding step costs about this many times the anchor's.
DESIGN_DECODE_RATIO = (1.35, 1.5)
MODELS = ('anchor', 'composed')


def build(size: str) -> tuple[CalmConfig, dict[str, Any]]:
  """(config, decoding settings) of a named size; bridges every 4 layers, non-zero output."""
  return common.composition(size, zero_init_out=False), dict(SIZES[size])


def cache_bytes(cache: Any) -> dict[str, int]:
  """Bytes of the cache leaves with a sequence axis ([B, L, K, H]), per top-level part.

  A single LM's cache {'layer_{i}': ...} is reported as 'anchor'; the composed cache's parts
  are 'anchor', 'augments' and 'bridge' ('prompt_length' [B] has no sequence axis).
  """
  parts = cache if 'prompt_length' in cache else {'anchor': cache}
  return {name: sum(int(x.nbytes) for x in jax.tree.leaves(tree) if x.ndim == 4)
          for name, tree in parts.items() if name != 'prompt_length'}


def median_times(calls: dict[str, Callable[[], Any]], runs: int,
                 budget_s: float) -> dict[str, tuple[float, int, Any]]:
  """Median seconds of each `calls[name]()` (blocked on) after one warm-up call.

  The calls take turns (one of each per round) so that a change of load on a shared machine
  hits all of them alike. The programs are compiled beforehand, so a warm-up call only settles
  memory and threads: one that alone takes `budget_s` or more is itself the (single)
  measurement. The others are timed up to `runs` times each, until they took `budget_s`.

  Returns:
    {name: (median seconds, number of calls timed, output of its last call)}.
  """
  times: dict[str, list[float]] = {}
  outs = {}
  for name, call in calls.items():
    start = time.perf_counter()
    outs[name] = jax.block_until_ready(call())
    elapsed = time.perf_counter() - start
    times[name] = [elapsed] if elapsed >= budget_s else []
  while True:
    pending = [n for n, t in times.items() if len(t) < runs and sum(t) < budget_s]
    if not pending:
      break
    for name in pending:
      start = time.perf_counter()
      outs[name] = jax.block_until_ready(calls[name]())
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), len(t), outs[name]) for name, t in times.items()}


class Programs(NamedTuple):
  """The three jitted programs of one (model, batch, context), their inputs and compiles.

  Attributes:
    prefill: `fn(params, tokens, prompt_mask) -> (last prompt index, logits, cache)`.
    step: `fn(params, token [B, 1], positions [B, 1], cache) -> (logits, cache)`, cache donated.
    generate: `make_generate_fn`'s `fn(params, tokens, prompt_mask, rng)`.
    tokens: [B, P] prompts (every prompt fills its P positions).
    prompt_mask: [B, P] ones.
  """

  prefill: Any
  step: Any
  generate: Any
  tokens: jax.Array
  prompt_mask: jax.Array


def lower_programs(model: nn.Module, params: Any, batch: int, context: int,
                   max_decode_len: int) -> Programs:
  """Traces and lowers the prefill, the decoding step and `generate` of `model` (no compile)."""
  vocab = (model.config.anchor if isinstance(model, Calm) else model.config).vocab_size
  tokens = jax.random.randint(jax.random.key(batch * 1000 + context), (batch, context), 1,
                              vocab, jnp.int32)
  prompt_mask = jnp.ones((batch, context), jnp.int32)

  def prefill(p, t, m):
    return decoding.prefill(model, p, t, m, max_decode_len)

  def step(p, token, positions, cache):
    return decoding.extend(model, p, token, positions, cache)

  prefill = jax.jit(prefill).lower(params, tokens, prompt_mask)
  cache = prefill.out_info[2]
  column = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  generate = decoding.make_generate_fn(model, max_decode_len=max_decode_len, eos_id=-1)
  return Programs(prefill, jax.jit(step, donate_argnums=(3,)).lower(params, column, column, cache),
                  generate.lower(params, tokens, prompt_mask, jax.random.key(0)),
                  tokens, prompt_mask)


def compile_programs(lowered: Programs, pool: concurrent.futures.Executor,
                     options: dict[str, Any]) -> Programs:
  """Submits the compilation of the three lowered programs to `pool`; fields become futures."""
  return lowered._replace(**{name: pool.submit(getattr(lowered, name).compile, options or None)
                             for name in ('prefill', 'step', 'generate')})


def measure(programs: dict[str, Programs], models: dict[str, tuple[nn.Module, Any]],
            settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Times the compiled `programs` of each model (in turns); sizes caches and counts FLOPs.

  Args:
    programs: {model name: its compiled programs} for one batch size and prompt length.
    models: {model name: (module, parameters)}.
    settings: the size's decoding settings (`build`).

  Returns:
    {model name: its row of the report}.
  """
  max_decode_len, runs, budget = (settings['max_decode_len'], settings['runs'],
                                  settings['budget_s'])
  some = next(iter(programs.values()))
  batch, context = some.tokens.shape
  cache_length = context + max_decode_len
  rows = {name: {'cache_length': cache_length} for name in programs}

  def time_all(key, calls, runs):  # Records {key}_s and {key}_runs; returns the outputs.
    outs = {}
    for name, (median, count, out) in median_times(calls, runs, budget).items():
      rows[name][f'{key}_s'], rows[name][f'{key}_runs'], outs[name] = median, count, out
    return outs

  prefilled = time_all('prefill', {
      name: functools.partial(p.prefill, models[name][1], p.tokens, p.prompt_mask)
      for name, p in programs.items()}, runs)

  token = jnp.ones((batch, 1), jnp.int32)
  state = {}
  for name, (last, _, cache) in prefilled.items():
    parts = cache_bytes(cache)
    rows[name]['cache_bytes_per_token'] = sum(parts.values()) / (batch * cache_length)
    rows[name]['cache_bytes_per_token_parts'] = {
        k: v / (batch * cache_length) for k, v in parts.items()}
    # Call k = 0, 1, ... feeds a token at sequence index P + k (cache slot P + k), as
    # `generate` does.
    state[name] = {'cache': cache, 'k': 0,
                   'positions': [(last + i)[:, None] for i in range(1, max_decode_len)]}
  del prefilled, cache

  def one_step(name):
    s = state[name]
    logits, s['cache'] = programs[name].step(models[name][1], token, s['positions'][s['k']],
                                             s['cache'])
    s['k'] = min(s['k'] + 1, max_decode_len - 2)
    return logits

  time_all('step', {name: functools.partial(one_step, name) for name in programs},
           min(settings['step_runs'], max_decode_len - 2))
  state.clear()  # Frees the caches.

  rng = jax.random.key(0)
  time_all('generate', {
      name: functools.partial(p.generate, models[name][1], p.tokens, p.prompt_mask, rng)
      for name, p in programs.items()}, runs)

  for name, row in rows.items():
    config = models[name][0].config
    row['generate_per_token_s'] = row['generate_s'] / max_decode_len
    row['generate_loop_per_token_s'] = (row['generate_s'] - row['prefill_s']) / (
        max_decode_len - 1)
    row['analytic_flops_per_token'] = flops.decode_step_flops(config, cache_length)
    row['step_xla_flops'] = common.xla_flops(programs[name].step)
    row['xla_flops_per_token'] = row['step_xla_flops'] / batch
    row['xla_over_analytic'] = row['xla_flops_per_token'] / row['analytic_flops_per_token']
    # A forward pass, but logits at one position per row (each row's last prompt token).
    anchor = config.anchor if isinstance(config, CalmConfig) else config
    row['prefill_analytic_flops'] = (
        flops.composed_forward_flops(config, batch, context) if isinstance(config, CalmConfig)
        else flops.lm_forward_flops(config, batch, context)) - (
            2 * batch * (context - 1) * anchor.embed_dim * anchor.vocab_size)
    row['prefill_xla_flops'] = common.xla_flops(programs[name].prefill)
  return rows


RATIO_KEYS = {'step_s': 'step_s', 'generate_per_token_s': 'generate_per_token_s',
              'generate_loop_per_token_s': 'generate_loop_per_token_s',
              'analytic_flops': 'analytic_flops_per_token', 'xla_flops': 'xla_flops_per_token',
              'prefill_s': 'prefill_s', 'cache_bytes_per_token': 'cache_bytes_per_token'}


def run(size: str, log: Callable[[str], None] = lambda _: None) -> dict:
  """Measures every (model, batch, context) at `size`; returns the JSON-ready report."""
  config, settings = build(size)
  abstract = nn.unbox(calm_lib.abstract_params(config))
  frozen = jax.tree.map(jnp.asarray, random_like(
      {'anchor': abstract['anchor'], 'augments': abstract['augments']}))
  bridges = calm_lib.init_bridge_params(config, jax.random.key(0))
  models = {'anchor': (Transformer(config.anchor), frozen['anchor']),
            'composed': (Calm(config), trainable.merge_params(bridges, frozen))}

  # Trace and lower every program here while a pool compiles them on every core (XLA releases
  # the interpreter lock); then time them, with no compilation running beside.
  start = time.perf_counter()
  keys = [(name, batch, context) for batch in settings['batches']
          for context in settings['contexts'] for name in MODELS]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    pending = [compile_programs(lower_programs(*models[name], batch, context,
                                               settings['max_decode_len']),
                                pool, settings['compiler_options'])
               for name, batch, context in keys]
    compiled = {key: p._replace(prefill=p.prefill.result(), step=p.step.result(),
                                generate=p.generate.result())
                for key, p in zip(keys, pending)}
  compile_s = time.perf_counter() - start
  log(f'lowered and compiled {3 * len(compiled)} programs in {compile_s:.1f} s')
  rows = []
  for batch in settings['batches']:
    for context in settings['contexts']:
      start = time.perf_counter()
      measured = measure({name: compiled[name, batch, context] for name in MODELS}, models,
                         settings)
      rows += [{'model': name, 'batch': batch, 'context': context, **measured[name]}
               for name in MODELS]
      log(f'B={batch:<3} P={context:<4} step ' + '  '.join(
          f'{name} {measured[name]["step_s"] * 1e3:.2f} ms' for name in MODELS)
          + f'  (timed in {time.perf_counter() - start:.1f} s)')

  def find(name, batch, context):
    return next(r for r in rows
                if (r['model'], r['batch'], r['context']) == (name, batch, context))

  ratios = []
  for batch in settings['batches']:
    for context in settings['contexts']:
      anchor, composed = find('anchor', batch, context), find('composed', batch, context)
      ratios.append({'batch': batch, 'context': context,
                     **{k: composed[v] / anchor[v] for k, v in RATIO_KEYS.items()}})

  return {'size': size, **settings, **common.report_header(config, frozen, bridges),
          'design_decode_ratio': list(DESIGN_DECODE_RATIO), 'compile_s': compile_s,
          'rows': rows, 'ratios': ratios}


def table(report: dict) -> str:
  """A compact text table of the report: per-row costs, then composed / anchor ratios."""
  lines = [f'{"model":<8} {"B":>3} {"P":>4} {"prefill ms":>11} {"step ms":>9} '
           f'{"gen ms/tok":>10} {"MFLOP/tok":>10} {"xla/an":>7} {"cache B/tok":>11}']
  for r in report['rows']:
    lines.append(f'{r["model"]:<8} {r["batch"]:>3} {r["context"]:>4} '
                 f'{r["prefill_s"] * 1e3:>11.2f} {r["step_s"] * 1e3:>9.3f} '
                 f'{r["generate_per_token_s"] * 1e3:>10.3f} '
                 f'{r["analytic_flops_per_token"] / 1e6:>10.2f} {r["xla_over_analytic"]:>7.3f} '
                 f'{r["cache_bytes_per_token"]:>11.0f}')
  low, high = report['design_decode_ratio']
  lines.append(f'composed / anchor (design: decoding {low}-{high}x the anchor per token)')
  lines.append(f'{"B":>3} {"P":>4} {"step":>6} {"gen/tok":>7} {"loop/tok":>8} {"FLOPs":>6} '
               f'{"XLA":>6} {"prefill":>7} {"cache":>6}')
  for r in report['ratios']:
    lines.append(f'{r["batch"]:>3} {r["context"]:>4} {r["step_s"]:>6.2f} '
                 f'{r["generate_per_token_s"]:>7.2f} {r["generate_loop_per_token_s"]:>8.2f} '
                 f'{r["analytic_flops"]:>6.3f} {r["xla_flops"]:>6.3f} {r["prefill_s"]:>7.2f} '
                 f'{r["cache_bytes_per_token"]:>6.3f}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  """Command line: runs one size, writes its JSON report and prints the table."""
  args = common.parse_args(__doc__, sorted(SIZES), 'decode', argv)
  start, load = time.perf_counter(), os.getloadavg()
  report = run(args.size, log=lambda line: print(line, file=sys.stderr, flush=True))
  report['total_s'] = time.perf_counter() - start
  # Other processes on the machine make times noisy: 1-minute load average, start and end.
  report['machine']['load_average'] = [load[0], os.getloadavg()[0]]
  output = common.write_report(report, args.output, 'decode', args.size)
  print(table(report))
  print(f'wrote {output} ({report["total_s"]:.0f} s)', file=sys.stderr)


if __name__ == '__main__':
  main()
