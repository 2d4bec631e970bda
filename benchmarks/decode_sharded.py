"""Sharded decoding: the composition's generate on meshes of 8 emulated CPU devices against one.

For the composition of `common.composition(size)` (bridges every 4 layers, non-zero output),
B prompts of P tokens and max_decode_len N new tokens, on one device and on each mesh of
`MESHES` (replica x data x model over 8 devices, FSDP or not; `partitioning.MeshConfig`):

  tokens_equal        the mesh's greedy tokens equal the one device's (every row, every step);
  params_bytes        the largest share of the parameters one device holds (exact, from the
                      shardings `decoding.mesh_placement` gives them);
  cache_bytes         the largest share of the decoding cache of B rows of P + N slots one
                      device holds (`decoding.cache_shardings`);
  argument_bytes, temp_bytes
                      XLA's memory analysis of the compiled generate, per device;
  generate_s          median wall time of the compiled generate (prefill and N steps);
                      `generate_per_token_s` divides it by N.

Eight emulated devices share this machine's cores, so the times show that a mesh decodes, not
how fast a pod would; the bytes per device are what a mesh divides. The device count is fixed
when JAX starts: run as a script, it asks for 8 host devices itself unless XLA_FLAGS already
sets a count (benchmarks/decode.py runs it as a subprocess and adds its report under
`sharded`; importing it changes nothing).

  python benchmarks/decode_sharded.py [--size=toy|small] [--output=PATH]
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

if __name__ == '__main__' and ('xla_force_host_platform_device_count'
                               not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import calm as calm_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax import decoding, partitioning, trainable  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.calm import Calm  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.random_init import random_like  # pylint: disable=g-import-not-at-top,wrong-import-position

DEVICES = 8
# (replica, data, model), FSDP: batch over replica x data, heads / MLP / vocab over model.
MESHES = (((1, 8, 1), False), ((1, 4, 2), False), ((1, 2, 4), False), ((1, 4, 2), True))
SIZES = {
    # About 3 minutes on 2 cores.
    'toy': dict(batch=8, context=512, max_decode_len=32, runs=3, compiler_options={}),
    # What CI runs; XLA's cheapest CPU optimisation level (compiles fast, indicative times).
    'small': dict(batch=8, context=16, max_decode_len=8, runs=1,
                  compiler_options={'xla_backend_optimization_level': 0}),
}


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (arrays or shapes) laid out in `shardings` (the
  largest shard of each leaf: shards of one sharding are the same size)."""
  return int(sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def prompts(vocab: int, batch: int, context: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] prompts of ragged lengths (1..P) and their masks."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, vocab, (batch, context)).astype(np.int32)
  lengths = rng.integers(1, context + 1, batch)
  lengths[0] = context  # One row fills the prompt.
  return tokens, (np.arange(context)[None] < lengths[:, None]).astype(np.int32)


def measure(model: nn.Module, params: Any, tokens: np.ndarray, mask: np.ndarray,
            settings: dict[str, Any], mesh: jax.sharding.Mesh | None = None,
            rules: Any = None) -> tuple[dict[str, Any], np.ndarray]:
  """(row of the report, tokens) of `model`'s greedy generate on `mesh` (None: one device)."""
  fn = decoding.make_generate_fn(model, max_decode_len=settings['max_decode_len'], eos_id=-1,
                                 mesh=mesh, rules=rules)
  key = jax.random.key(0)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placement = jax.tree.map(lambda _: one, params)
    cache_sharding = lambda cache: jax.tree.map(lambda _: one, cache)  # pylint: disable=unnecessary-lambda-assignment
    args = (jax.device_put(params, one), jnp.asarray(tokens), jnp.asarray(mask))
  else:
    placement = decoding.mesh_placement(mesh, rules)(model)
    cache_sharding = lambda cache: decoding.cache_shardings(cache, mesh, rules)  # pylint: disable=unnecessary-lambda-assignment
    batch = partitioning.batch_sharding(mesh, rules)
    args = (decoding.shard_params(model, params, mesh, rules), jax.device_put(tokens, batch),
            jax.device_put(mask, batch))
  start = time.perf_counter()
  compiled = fn.lower(*args, key).compile(settings['compiler_options'] or None)
  compile_s = time.perf_counter() - start
  times, out = [], None
  for _ in range(1 + settings['runs']):  # One warm-up call.
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args, key))
    times.append(time.perf_counter() - start)
  cache = jax.eval_shape(lambda p, t, m: decoding.prefill(
      model, p, t, m, settings['max_decode_len'])[2], *args)
  memory = compiled.memory_analysis()
  median = float(np.median(times[1:]))
  row = {'params_bytes': shard_bytes(args[0], placement),
         'cache_bytes': shard_bytes(cache, cache_sharding(cache)),
         'argument_bytes': int(getattr(memory, 'argument_size_in_bytes', 0)),
         'temp_bytes': int(getattr(memory, 'temp_size_in_bytes', 0)),
         'compile_s': compile_s, 'generate_s': median,
         'generate_per_token_s': median / settings['max_decode_len'],
         'generate_runs': settings['runs']}
  return row, np.asarray(jax.device_get(out))


def run(size: str, log: Callable[[str], None] = lambda _: None) -> dict:
  """The one-device row and a row per mesh of `MESHES`; returns the JSON-ready report."""
  if jax.device_count() < DEVICES:
    raise RuntimeError(f'{DEVICES} devices are needed, JAX sees {jax.device_count()}: set '
                       f'XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}.')
  settings = dict(SIZES[size])
  config = common.composition(size, zero_init_out=False)
  abstract = nn.unbox(calm_lib.abstract_params(config))
  frozen = jax.tree.map(jnp.asarray, random_like(
      {'anchor': abstract['anchor'], 'augments': abstract['augments']}))
  bridges = calm_lib.init_bridge_params(config, jax.random.key(0))
  model, params = Calm(config), trainable.merge_params(bridges, frozen)
  tokens, mask = prompts(config.anchor.vocab_size, settings['batch'], settings['context'])
  devices = jax.devices()[:DEVICES]
  reference, expected = measure(model, params, tokens, mask, settings)
  rows = [{'mesh': 'one device', 'devices': 1, 'tokens_equal': True, **reference}]
  log(f'one device: {reference["generate_per_token_s"] * 1e3:.2f} ms/token, '
      f'params {reference["params_bytes"]:,} B, cache {reference["cache_bytes"]:,} B')
  for shape, fsdp in MESHES:
    mesh_config = partitioning.MeshConfig(replica=shape[0], data=shape[1], model=shape[2],
                                          fsdp=fsdp)
    mesh, rules = partitioning.make_mesh(mesh_config, devices), mesh_config.rules()
    row, out = measure(model, params, tokens, mask, settings, mesh, rules)
    name = f'{"x".join(map(str, shape))}{" fsdp" if fsdp else ""}'
    rows.append({'mesh': name, 'devices': DEVICES, 'tokens_equal': bool(np.array_equal(
        out, expected)), **row})
    log(f'{name}: tokens equal {rows[-1]["tokens_equal"]}, '
        f'{row["generate_per_token_s"] * 1e3:.2f} ms/token, params {row["params_bytes"]:,} B '
        f'/ device, cache {row["cache_bytes"]:,} B / device')
  return {'size': size, **settings, **common.report_header(config, frozen, bridges),
          'device_count': jax.device_count(), 'rows': rows}


def table(report: dict) -> str:
  """A compact text table of the report."""
  lines = [f'composed generate, B={report["batch"]} P={report["context"]} '
           f'N={report["max_decode_len"]} ({report["device_count"]} emulated devices)',
           f'{"mesh":<12} {"equal":>5} {"ms/token":>9} {"params B/dev":>13} '
           f'{"cache B/dev":>12} {"temp B/dev":>12}']
  for r in report['rows']:
    lines.append(f'{r["mesh"]:<12} {str(r["tokens_equal"]):>5} '
                 f'{r["generate_per_token_s"] * 1e3:>9.2f} {r["params_bytes"]:>13,} '
                 f'{r["cache_bytes"]:>12,} {r["temp_bytes"]:>12,}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  """Command line: runs one size, writes its JSON report and prints the table."""
  args = common.parse_args(__doc__, sorted(SIZES), 'decode_sharded', argv)
  start, load = time.perf_counter(), os.getloadavg()
  report = run(args.size, log=lambda line: print(line, file=sys.stderr, flush=True))
  report['total_s'] = time.perf_counter() - start
  report['machine']['load_average'] = [load[0], os.getloadavg()[0]]
  output = common.write_report(report, args.output, 'decode_sharded', args.size)
  print(table(report))
  print(f'wrote {output} ({report["total_s"]:.0f} s)', file=sys.stderr)


if __name__ == '__main__':
  main()
