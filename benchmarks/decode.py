"""Cost of decoding with the composition: the KV-cached decoder of the anchor alone and composed.

For each model (the anchor `Transformer` and the composed `Calm`), batch size B and context
length P, with cache length L = P + max_decode_len, measures:

  step_s           median wall time of ONE jitted decoding step (`decoding.extend` on tokens
                   [B, 1], cache donated and carried from call to call): the new token of each
                   row is the (P + 1 + k)-th of its sequence at call k (`step_positions`). The
                   cache is the prefill's where the prefill is timed, else zeros of its shape
                   (what the step costs does not depend on the values);
  prefill_s        (contexts in `prefill_contexts`) median wall time of the jitted prefill
                   (`decoding.prefill`) of B prompts of P tokens, after one warm-up call;
  generate_s       (the same contexts) median wall time of `make_generate_fn` producing
                   max_decode_len tokens per row (eos_id = -1: no row stops early), prefill
                   included; `generate_per_token_s` divides it by max_decode_len,
                   `generate_loop_per_token_s` subtracts the prefill and divides by the
                   max_decode_len - 1 loop steps;
  cache bytes      bytes of every cache leaf with a sequence axis / (B * L), per part (anchor,
                   augments, bridge; the composed cache's [B] `prompt_length` is left out);
  FLOPs per token  the analytic count of one decoding step per row at the current length
                   (`flops.decode_step_flops`: n = P + 1 + k keys per global layer, the mean over
                   the timed steps; min(n, window) per window layer) and at the cache length
                   (`every_slot`, what a step that reads every slot would cost), and XLA's cost
                   analysis of the compiled step / B (which counts a loop body once: exact while
                   the cache fits in one block of `Transformer.decode_block_size` slots).

  bytes per step   the analytic bytes one step reads at the same length (`step_bytes`):
                   the parameters once (an embedding table only its B looked-up rows, unless
                   it is also the head) and every cache leaf up to min(length, its slots).

Ratios composed / anchor of each are reported per (B, P), with `wall_over_analytic`: the wall
ratio over the analytic FLOP one (1.0: the composition costs what its FLOPs say), and
`wall_over_bytes`: over the bytes one (1.0: it costs what it reads, a memory-bound step).

Two more tables: `progress`, one step of each model at B = 8 in a cache of `progress_cache`
slots at several positions, blocked (the default) and reading every slot
(`decode_block_size=None`): a step's cost follows its position, not the cache's size; and
`window_cache`, the cache bytes per layer of a Gemma-2-2B (window 4096) decoder by sequence
length, from shapes alone (`jax.eval_shape` of the prefill): a window layer's stop growing at
its window.

And `sharded`: the report of benchmarks/decode_sharded.py at the same size, run as a
subprocess on 8 emulated devices (the composition's generate on meshes 8x1, 4x2, 2x4 and 4x2
FSDP against one device: equal tokens, bytes per device, times).

  python benchmarks/decode.py [--size=toy|small] [--output=PATH]
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import decode_sharded  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import calm as calm_lib
from calm_jax import decoding, flops, presets, trainable
from calm_jax.calm import Calm
from calm_jax.configs import CalmConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params

# Decoding settings per model size of `common.MODELS`: batches, prompt lengths and runs.
SIZES = {
    # About 15 minutes on 2 cores.
    'toy': dict(batches=(1, 8, 32), contexts=(128, 512, 2048), prefill_contexts=(128, 512),
                max_decode_len=32, runs=3, step_runs=10, budget_s=10.0, compiler_options={},
                progress_cache=2048 + 32, progress_positions=(128, 512, 2047)),
    # What CI runs: about 150 CPU-seconds, most of them compiling its programs. XLA's default
    # CPU backend optimisation would compile 2.5x longer; it uses the cheapest level instead
    # (same HLO and FLOP counts, slower kernels: its times are only indicative).
    'small': dict(batches=(1, 8, 32), contexts=(16, 32), prefill_contexts=(16, 32),
                  max_decode_len=8, runs=1, step_runs=3, budget_s=0.5,
                  compiler_options={'xla_backend_optimization_level': 0},
                  progress_cache=64, progress_positions=(8, 63)),
}
# Sequence lengths of the window-cache table (Gemma-2-2B: window 4096).
WINDOW_CACHE_LENGTHS = (1024, 4096, 8192, 32768)

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
  """The jitted programs of one (model, batch, context), their inputs and compiles.

  Attributes:
    prefill: `fn(params, tokens, prompt_mask) -> (last prompt index, logits, cache)`.
    step: `fn(params, token [B, 1], positions [B, 1], cache) -> (logits, cache)`, cache donated.
    generate: `make_generate_fn`'s `fn(params, tokens, prompt_mask, rng)`, or None (a context
      whose prefill and generation are not timed).
    tokens: [B, P] prompts (every prompt fills its P positions).
    prompt_mask: [B, P] ones.
    timed_prefill: whether the prefill and generation are timed.
  """

  prefill: Any
  step: Any
  generate: Any
  tokens: jax.Array
  prompt_mask: jax.Array
  timed_prefill: bool


def lower_programs(model: nn.Module, params: Any, batch: int, context: int,
                   max_decode_len: int, timed_prefill: bool = True) -> Programs:
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
  step = jax.jit(step, donate_argnums=(3,)).lower(params, column, column, cache)
  generate = None
  if timed_prefill:
    generate = decoding.make_generate_fn(model, max_decode_len=max_decode_len, eos_id=-1).lower(
        params, tokens, prompt_mask, jax.random.key(0))
  return Programs(prefill, step, generate, tokens, prompt_mask, timed_prefill)


def compile_programs(lowered: Programs, pool: concurrent.futures.Executor,
                     options: dict[str, Any]) -> Programs:
  """Submits the compilation of the lowered programs to `pool`; fields become futures (a
  prefill that is not timed stays lowered: its output shapes give the cache)."""
  names = ('prefill', 'step', 'generate') if lowered.timed_prefill else ('step',)
  return lowered._replace(**{name: pool.submit(getattr(lowered, name).compile, options or None)
                             for name in names})


def zeros_cache(prefill: Any) -> Any:
  """Zeros of the cache a (lowered or compiled) prefill returns."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), prefill.out_info[2])


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
  timed = some.timed_prefill
  rows = {name: {'cache_length': cache_length} for name in programs}

  def time_all(key, calls, runs):  # Records {key}_s and {key}_runs; returns the outputs.
    outs = {}
    for name, (median, count, out) in median_times(calls, runs, budget).items():
      rows[name][f'{key}_s'], rows[name][f'{key}_runs'], outs[name] = median, count, out
    return outs

  if timed:
    prefilled = time_all('prefill', {
        name: functools.partial(p.prefill, models[name][1], p.tokens, p.prompt_mask)
        for name, p in programs.items()}, runs)
    caches = {name: out[2] for name, out in prefilled.items()}
    del prefilled
  else:
    caches = {name: zeros_cache(p.prefill) for name, p in programs.items()}

  token = jnp.ones((batch, 1), jnp.int32)
  state = {}
  steps = min(settings['step_runs'], max_decode_len - 2)
  cache_shapes = {name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
                  for name, cache in caches.items()}
  for name, cache in caches.items():
    parts = cache_bytes(cache)
    rows[name]['cache_bytes_per_token'] = sum(parts.values()) / (batch * cache_length)
    rows[name]['cache_bytes_per_token_parts'] = {
        k: v / (batch * cache_length) for k, v in parts.items()}
    # Call k = 0, 1, ... feeds a token at sequence index P + k, as `generate` does.
    state[name] = {'cache': cache, 'k': 0,
                   'positions': [jnp.full((batch, 1), context + i, jnp.int32)
                                 for i in range(max_decode_len - 1)]}
  del caches, cache

  def one_step(name):
    s = state[name]
    logits, s['cache'] = programs[name].step(models[name][1], token, s['positions'][s['k']],
                                             s['cache'])
    s['k'] = min(s['k'] + 1, max_decode_len - 2)
    return logits

  time_all('step', {name: functools.partial(one_step, name) for name in programs}, steps)
  timed_steps = {name: state[name]['k'] for name in programs}
  state.clear()  # Frees the caches.

  if timed:
    rng = jax.random.key(0)
    time_all('generate', {
        name: functools.partial(p.generate, models[name][1], p.tokens, p.prompt_mask, rng)
        for name, p in programs.items()}, runs)

  for name, row in rows.items():
    config = models[name][0].config
    if timed:
      row['generate_per_token_s'] = row['generate_s'] / max_decode_len
      row['generate_loop_per_token_s'] = (row['generate_s'] - row['prefill_s']) / (
          max_decode_len - 1)
    # The k-th call's token is the (P + 1 + k)-th: the mean length over the calls made (the
    # warm-up included).
    length = context + 1 + (timed_steps[name] - 1) / 2
    row['step_positions'] = [context, context + timed_steps[name] - 1]
    row['analytic_flops_per_token'] = flops.decode_step_flops(config, int(round(length)))
    row['analytic_step_bytes'] = step_bytes(models[name][0], models[name][1], cache_shapes[name],
                                            int(round(length)))
    row['analytic_step_bytes_total'] = sum(row['analytic_step_bytes'].values())
    row['analytic_flops_per_token_every_slot'] = flops.decode_step_flops(
        config, cache_length, every_slot=True)
    row['step_xla_flops'] = common.xla_flops(programs[name].step)
    row['xla_flops_per_token'] = row['step_xla_flops'] / batch
    row['xla_over_analytic'] = row['xla_flops_per_token'] / row['analytic_flops_per_token']
    if timed:
      # A forward pass, but logits at one position per row (each row's last prompt token).
      anchor = config.anchor if isinstance(config, CalmConfig) else config
      row['prefill_analytic_flops'] = (
          flops.composed_forward_flops(config, batch, context)
          if isinstance(config, CalmConfig) else flops.lm_forward_flops(config, batch, context)
      ) - (2 * batch * (context - 1) * anchor.embed_dim * anchor.vocab_size)
      row['prefill_xla_flops'] = common.xla_flops(programs[name].prefill)
  return rows


def step_bytes(model: nn.Module, params: Any, cache: Any, length: int) -> dict[str, int]:
  """Analytic bytes one decoding step reads at sequence length `length`, by kind.

  'params': every parameter once, except input embedding tables, of which only the B rows
  looked up are read (a tied table is also the anchor's head: read whole); 'cache': each [B,
  L, K, H] cache leaf up to min(length, L) slots per row (a window's ring holds L = window).
  """
  batch = jax.tree.leaves(cache)[0].shape[0]
  anchor = model.config.anchor if isinstance(model, Calm) else model.config
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, 'key', None) for k in path]
    nbytes = leaf.size * leaf.dtype.itemsize
    if 'input_embedding' in keys:
      is_head = anchor.tie_embeddings and (not isinstance(model, Calm) or keys[0] == 'anchor')
      if not is_head:
        nbytes = batch * leaf.shape[-1] * leaf.dtype.itemsize
    total += nbytes
  cached = sum(x.shape[0] * min(length, x.shape[1]) * x.shape[2] * x.shape[3] * x.dtype.itemsize
               for x in jax.tree.leaves(cache) if x.ndim == 4)
  return {'params': int(total), 'cache': int(cached)}


RATIO_KEYS = {'step_s': 'step_s', 'generate_per_token_s': 'generate_per_token_s',
              'generate_loop_per_token_s': 'generate_loop_per_token_s',
              'analytic_flops': 'analytic_flops_per_token',
              'analytic_flops_every_slot': 'analytic_flops_per_token_every_slot',
              'xla_flops': 'xla_flops_per_token', 'prefill_s': 'prefill_s',
              'cache_bytes_per_token': 'cache_bytes_per_token',
              'analytic_bytes': 'analytic_step_bytes_total'}


def progress(models: dict[str, tuple[nn.Module, Any]], settings: dict[str, Any],
             batch: int = 8) -> list[dict[str, Any]]:
  """One step of each model at each of `progress_positions` in a cache of `progress_cache`
  slots, blocked (the models' default) and reading every slot: median seconds."""
  slots, positions = settings['progress_cache'], settings['progress_positions']
  out = []
  for name, (model, params) in models.items():
    for block in (model.decode_block_size, None):
      variant = model.clone(decode_block_size=block)
      tokens = jnp.ones((batch, slots - settings['max_decode_len']), jnp.int32)
      prefill = jax.jit(lambda p, t, m, v=variant: decoding.prefill(
          v, p, t, m, settings['max_decode_len'])).lower(params, tokens, jnp.ones_like(tokens))
      step = jax.jit(lambda p, t, pos, c, v=variant: decoding.extend(v, p, t, pos, c),
                     donate_argnums=(3,))
      token = jnp.ones((batch, 1), jnp.int32)
      state = {'cache': zeros_cache(prefill)}
      compiled = step.lower(params, token, token, state['cache']).compile(
          settings['compiler_options'] or None)

      def call(position, state=state, compiled=compiled, token=token, params=params):
        # The cache is donated and carried from call to call, as in decoding; each call at
        # one position rewrites the same slot.
        logits, state['cache'] = compiled(params, token,
                                          jnp.full((batch, 1), position, jnp.int32),
                                          state['cache'])
        return logits

      calls = {p: functools.partial(call, p) for p in positions}
      for p, (median, count, _) in median_times(calls, settings['step_runs'],
                                                settings['budget_s']).items():
        out.append({'model': name, 'decode_block_size': block, 'cache_slots': slots,
                    'batch': batch, 'position': p, 'step_s': median, 'runs': count,
                    'analytic_flops_per_token': flops.decode_step_flops(model.config, p + 1)})
  return out


def window_cache(lengths=WINDOW_CACHE_LENGTHS) -> dict[str, Any]:
  """Cache bytes per layer of Gemma-2-2B (bfloat16) decoding one row, by sequence length,
  window and global layers apart, from the prefill's output shapes (nothing is computed)."""
  config = dataclasses.replace(presets.gemma2_2b(), dtype='bfloat16', param_dtype='bfloat16')
  params = nn.unbox(abstract_params(config))
  model = Transformer(config)
  rows = []
  for length in lengths:
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    cache = jax.eval_shape(lambda p, t, n=length: model.apply(
        {'params': p}, t, jnp.ones(t.shape, jnp.int32), cache_length=n,
        method=Transformer.prefill).cache, params, tokens)
    sizes = {}
    for i in range(config.num_layers):
      kind = 'window' if config.layer_window(i) is not None else 'global'
      layer = cache[f'layer_{i}']
      sizes[kind] = sum(math.prod(x.shape) * x.dtype.itemsize for x in layer.values())
    rows.append({'length': length, 'bytes_per_window_layer': sizes['window'],
                 'bytes_per_global_layer': sizes['global']})
  return {'model': 'gemma2_2b', 'window': config.sliding_window, 'rows': rows}


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
                                               settings['max_decode_len'],
                                               context in settings['prefill_contexts']),
                                pool, settings['compiler_options'])
               for name, batch, context in keys]
    compiled = {}
    for key, p in zip(keys, pending):
      done = {n: getattr(p, n).result() for n in ('prefill', 'step', 'generate')
              if isinstance(getattr(p, n), concurrent.futures.Future)}
      compiled[key] = p._replace(**done)
  compile_s = time.perf_counter() - start
  log(f'lowered and compiled the programs of {len(compiled)} (model, batch, context) in '
      f'{compile_s:.1f} s')
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
  del compiled

  def find(name, batch, context):
    return next(r for r in rows
                if (r['model'], r['batch'], r['context']) == (name, batch, context))

  ratios = []
  for batch in settings['batches']:
    for context in settings['contexts']:
      anchor, composed = find('anchor', batch, context), find('composed', batch, context)
      ratio = {'batch': batch, 'context': context,
               **{k: composed[v] / anchor[v] for k, v in RATIO_KEYS.items()
                  if v in anchor and v in composed}}
      ratio['wall_over_analytic'] = ratio['step_s'] / ratio['analytic_flops']
      ratio['wall_over_bytes'] = ratio['step_s'] / ratio['analytic_bytes']
      ratios.append(ratio)
  start = time.perf_counter()
  steps = progress(models, settings)
  log(f'progress table in {time.perf_counter() - start:.1f} s')

  start = time.perf_counter()
  on_meshes = sharded(size)
  log(f'sharded decoding on {on_meshes["device_count"]} emulated devices in '
      f'{time.perf_counter() - start:.1f} s')

  return {'size': size, **settings, **common.report_header(config, frozen, bridges),
          'design_decode_ratio': list(DESIGN_DECODE_RATIO), 'compile_s': compile_s,
          'rows': rows, 'ratios': ratios, 'progress': steps, 'window_cache': window_cache(),
          'sharded': on_meshes}


def sharded(size: str) -> dict[str, Any]:
  """The report of benchmarks/decode_sharded.py at `size`, run in a process of 8 emulated
  devices (this one's device count was fixed when JAX started)."""
  script = decode_sharded.__file__
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  with tempfile.TemporaryDirectory() as tmp:
    output = os.path.join(tmp, 'sharded.json')
    result = subprocess.run([sys.executable, script, f'--size={size}', f'--output={output}'],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode:
      raise RuntimeError(f'{script} failed:\n{result.stderr[-3000:]}')
    with open(output) as f:
      return json.load(f)


def _ms(row: dict, key: str, width: int, digits: int) -> str:
  return f'{row[key] * 1e3:>{width}.{digits}f}' if key in row else f'{"-":>{width}}'


def table(report: dict) -> str:
  """A compact text table of the report: per-row costs, composed / anchor ratios, the
  progress and window-cache tables."""
  lines = [f'{"model":<8} {"B":>3} {"P":>4} {"prefill ms":>11} {"step ms":>9} '
           f'{"gen ms/tok":>10} {"MFLOP/tok":>10} {"xla/an":>7} {"cache B/tok":>11}']
  for r in report['rows']:
    lines.append(f'{r["model"]:<8} {r["batch"]:>3} {r["context"]:>4} '
                 f'{_ms(r, "prefill_s", 11, 2)} {r["step_s"] * 1e3:>9.3f} '
                 f'{_ms(r, "generate_per_token_s", 10, 3)} '
                 f'{r["analytic_flops_per_token"] / 1e6:>10.2f} {r["xla_over_analytic"]:>7.3f} '
                 f'{r["cache_bytes_per_token"]:>11.0f}')
  low, high = report['design_decode_ratio']
  lines.append(f'composed / anchor (design: decoding {low}-{high}x the anchor per token)')
  lines.append(f'{"B":>3} {"P":>4} {"step":>6} {"FLOPs":>6} {"wall/FLOPs":>10} {"bytes":>6} '
               f'{"wall/bytes":>10} {"gen/tok":>7} {"loop/tok":>8} {"prefill":>7} {"cache":>6}')
  fmt = lambda r, k, w, d: f'{r[k]:>{w}.{d}f}' if k in r else f'{"-":>{w}}'
  for r in report['ratios']:
    lines.append(f'{r["batch"]:>3} {r["context"]:>4} {r["step_s"]:>6.2f} '
                 f'{r["analytic_flops"]:>6.3f} {r["wall_over_analytic"]:>10.3f} '
                 f'{r["analytic_bytes"]:>6.3f} {r["wall_over_bytes"]:>10.3f} '
                 f'{fmt(r, "generate_per_token_s", 7, 2)} '
                 f'{fmt(r, "generate_loop_per_token_s", 8, 2)} {fmt(r, "prefill_s", 7, 2)} '
                 f'{r["cache_bytes_per_token"]:>6.3f}')
  lines.append('one step at B = 8 in a cache of '
               f'{report["progress"][0]["cache_slots"]} slots, by position (ms)')
  for r in report['progress']:
    lines.append(f'  {r["model"]:<8} blocks {str(r["decode_block_size"]):<5} '
                 f'position {r["position"]:>5}: {r["step_s"] * 1e3:8.3f}')
  lines.append(decode_sharded.table(report['sharded']))
  window = report['window_cache']
  lines.append(f'{window["model"]} cache bytes per layer (window {window["window"]})')
  for r in window['rows']:
    lines.append(f'  length {r["length"]:>6}: window layer {r["bytes_per_window_layer"]:>12,}'
                 f'  global layer {r["bytes_per_global_layer"]:>12,}')
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
