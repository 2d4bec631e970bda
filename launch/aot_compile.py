#!/usr/bin/env python3
"""Compiles the composition train step for a TPU topology ahead of time, on any host (a CPU).

  python launch/aot_compile.py --anchor=gemma2_9b --augment=gemma2_2b --topology=v5p:4x4x4 \
      [--batch=64] [--length=2048] [--mesh-data=-1 --mesh-model=1] [--fsdp] [--num-slices=1] \
      [--remat=none|full|dots] [--attention-block-size=512] [--loss-chunk-size=512] \
      [--dtype=bfloat16] [--optimizer=adamw|adafactor] [--output=run.json] [--results=FILE]
  python launch/aot_compile.py --size=tiny --topology=v5e:2x2 --length=64

The TPU compiler (the `libtpu` package, in the `test` and `tpu` extras) describes the chips of
a topology without any TPU attached; the step is lowered with abstract arguments
(`jax.ShapeDtypeStruct`s carrying their shardings) and compiled for those chips. No parameter
is ever materialised, so a 9B + 2B composition compiles on a laptop-sized machine.

Topology names (`--topology`), as libtpu accepts them (`get_topology_desc`):
  v5e:AxB     TPU v5e (v5litepod-N, N = A*B chips; e.g. v5e:2x2, v5e:4x4, v5e:16x16)
  v6e:AxB     TPU v6e (Trillium; e.g. v6e:2x2, v6e:4x4)
  v5p:AxBxC   TPU v5p, one JAX device per chip (megacore; v5p-2N has N = A*B*C chips, e.g.
              v5p:2x2x1 is v5p-8, v5p:4x4x4 is v5p-128)
  v4:AxBxC    TPU v4, megacore as on Cloud TPU VMs (v4:2x2x1 is v4-8, v4:4x4x4 is v4-128)
libtpu itself also accepts `v5:AxBxC` for v5p and, for v4 without `chip_config_name=megacore`,
gives one device per TensorCore; this script always uses one device per chip. With
`--num-slices=S` the topology is S such slices joined over the data-centre network and the
mesh's `replica` axis spans them.

Reported per chip (XLA's buffer assignment of the SPMD-partitioned program, which is per
device): argument, output, alias (donated state reused for the output), temporary and
generated-code bytes, their total (argument + output - alias + temp + code) and XLA's own
peak, against the chip's HBM. Also XLA's cost analysis of the per-chip program: 'flops',
'bytes accessed', 'transcendentals' and 'optimal_seconds', the TPU cost model's step time
(negative, so unusable, for some model-parallel programs: the script then says so and gives a
roofline estimate from XLA's FLOPs and bytes, labelled as such); the analytic model FLOPs of
the step (`calm_jax.flops.composition_step_flops`) and the MFU they imply at that step time:
model FLOPs / (step seconds * chips * peak bf16 FLOP/s per chip).

Compiling a 9B + 2B step takes 5 to 10 minutes on 2 CPU cores and 5 to 9 GiB of RAM.

Exit status: 0 when the program compiled, 1 when compiling failed (for example out of HBM:
the JSON then holds the error), 2 for bad arguments.
"""

from __future__ import annotations

import os

# Before JAX loads: compile-only TPU devices need no TPU backend (CPU is the default backend),
# another process holding libtpu (any JAX program on this host once libtpu is installed) must
# not block this one, and there is no Cloud TPU metadata server to ask.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import importlib.metadata
import json
import math
import re
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax

from calm_jax import calm as calm_lib
from calm_jax import decoding
from calm_jax import flops as flops_lib
from calm_jax import optim, partitioning, presets
from calm_jax.calm import Calm
from calm_jax.trainable import count_params
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.train_step import lower_composition_step
from calm_jax.transformer import REMAT_CHOICES

GIB = 2**30
AUGMENT_NAME = 'augment'  # calm_jax.train's name for a single augment.


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the report needs to know about one TPU generation.

  Attributes:
    name: the name used in `--topology` (and its libtpu prefix).
    dims: number of topology dimensions (2: a 2D torus of chips, 3: a 3D one).
    hbm_gib: HBM per chip, GiB.
    peak_flops: peak dense bf16 FLOP/s per chip.
    hbm_bandwidth: HBM bandwidth per chip, bytes/s (roofline estimates only).
    topology_kwargs: extra `get_topology_desc` arguments (one JAX device per chip).
  """

  name: str
  dims: int
  hbm_gib: float
  peak_flops: float
  hbm_bandwidth: float
  topology_kwargs: tuple[tuple[str, Any], ...] = ()


CHIPS = {
    'v4': Chip('v4', 3, 32, 275e12, 1228e9, (('chip_config_name', 'megacore'),)),
    'v5e': Chip('v5e', 2, 16, 197e12, 819e9),
    'v5p': Chip('v5p', 3, 95, 459e12, 2765e9, (('chip_config_name', 'megacore'),)),
    'v6e': Chip('v6e', 2, 32, 918e12, 1640e9),
}

# A composition small enough to compile in seconds (tests): the anchor has 4 layers, the
# augment 8, so that BridgeConfig()'s every-4 rule connects augment layers 4 and 8 to anchor
# layers 2 and 4.
TINY_ANCHOR = TransformerConfig(vocab_size=256, embed_dim=64, num_layers=4, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=128)
TINY_AUGMENT = TransformerConfig(vocab_size=256, embed_dim=32, num_layers=8, num_heads=2,
                                 num_kv_heads=2, head_dim=16, mlp_dim=64)


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """Splits a topology name such as 'v5p:4x4x4' into its chip and its dimensions.

  Args:
    topology: 'CHIP:AxB' (v5e, v6e) or 'CHIP:AxBxC' (v4, v5p).

  Returns:
    (the chip's `Chip`, the chip counts along each dimension).

  Raises:
    ValueError: for an unknown chip or a malformed shape.
  """
  match = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', topology.strip().lower())
  if not match or match.group(1) not in CHIPS:
    raise ValueError(f'Unknown topology {topology!r}: use CHIP:AxB for {{v5e, v6e}} or '
                     f'CHIP:AxBxC for {{v4, v5p}}, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x1.')
  chip = CHIPS[match.group(1)]
  dims = tuple(int(d) for d in match.group(2).split('x'))
  if len(dims) != chip.dims or min(dims) < 1:
    raise ValueError(f'A {chip.name} topology has {chip.dims} positive dimensions, got '
                     f'{topology!r}.')
  return chip, dims


def topology_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list[Any]]:
  """Compile-only devices of `num_slices` slices of `topology`, from libtpu.

  Args:
    topology: a name accepted by `parse_topology`.
    num_slices: slices joined over the data-centre network (devices get a `slice_index`).

  Returns:
    (the chip, the devices: one per chip).

  Raises:
    RuntimeError: when libtpu is not installed.
  """
  chip, dims = parse_topology(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = f'{chip.name}:{"x".join(map(str, dims))}'
  kwargs = dict(chip.topology_kwargs)
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  description = topologies.get_topology_desc(topology_name=name, platform='tpu', **kwargs)
  devices = list(description.devices)
  expected = math.prod(dims) * num_slices
  if len(devices) != expected:
    raise RuntimeError(f'libtpu gave {len(devices)} devices for {num_slices} x {name}, '
                       f'expected {expected} (one per chip).')
  return chip, devices


def build_config(anchor: str, augment: str, size: str = 'preset',
                 dtype: str = 'bfloat16') -> CalmConfig:
  """The composition: `anchor` + one `augment` with BridgeConfig()'s every-4 rule.

  Args:
    anchor: a preset name (`calm_jax.presets`), ignored for size 'tiny'.
    augment: a preset name, ignored for size 'tiny'.
    size: 'preset' (the named presets) or 'tiny' (TINY_ANCHOR + TINY_AUGMENT).
    dtype: compute and parameter dtype of both models (and so of the bridges).
  """
  if size == 'tiny':
    anchor_cfg, augment_cfg = TINY_ANCHOR, TINY_AUGMENT
  elif size == 'preset':
    anchor_cfg, augment_cfg = presets.get_preset(anchor), presets.get_preset(augment)
  else:
    raise ValueError(f'Unknown size {size!r}; choose preset or tiny.')
  anchor_cfg, augment_cfg = (dataclasses.replace(c, dtype=dtype, param_dtype=dtype)
                             for c in (anchor_cfg, augment_cfg))
  return CalmConfig(anchor=anchor_cfg, augments={AUGMENT_NAME: augment_cfg},
                    bridges={AUGMENT_NAME: BridgeConfig()})


def lower_train_step(config: CalmConfig, mesh: jax.sharding.Mesh, rules: partitioning.Rules,
                     optimizer_name: str, batch: int, length: int,
                     constrain_activations: bool = True, remat: str = 'none',
                     attention_block_size: int | None = None,
                     loss_chunk_size: int | None = None) -> tuple[Any, dict[str, int]]:
  """`train_step.lower_composition_step` with `optim.make_optimizer(name=optimizer_name)`.

  The shardings are those `calm_jax.train` gives the same run (see there).

  Returns:
    (the `jax.stages.Lowered` step, {'frozen': parameters, 'trained': parameters}).
  """
  optimizer, _ = optim.make_optimizer(name=optimizer_name)
  return lower_composition_step(config, mesh, rules, optimizer, batch, length, remat=remat,
                                constrain_activations=constrain_activations,
                                attention_block_size=attention_block_size,
                                loss_chunk_size=loss_chunk_size)


def memory_report(compiled: Any, chip: Chip) -> dict[str, Any]:
  """Per-chip memory of a compiled program against the chip's HBM.

  Args:
    compiled: a `jax.stages.Compiled`.
    chip: its chip.

  Returns:
    Byte counts (argument, output, alias, temp, generated code, XLA's peak where it gives
    one), total = argument + output - alias + temp + code, GiB, HBM and whether it fits.
  """
  stats = compiled.memory_analysis()
  fields = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
            'alias_bytes': 'alias_size_in_bytes', 'temp_bytes': 'temp_size_in_bytes',
            'generated_code_bytes': 'generated_code_size_in_bytes',
            'xla_peak_bytes': 'peak_memory_in_bytes'}
  report = {key: int(getattr(stats, attr, 0) or 0) for key, attr in fields.items()}
  total = (report['argument_bytes'] + report['output_bytes'] - report['alias_bytes']
           + report['temp_bytes'] + report['generated_code_bytes'])
  used = max(total, report['xla_peak_bytes'])
  report.update(total_bytes=total, total_gib=round(total / GIB, 3), hbm_gib=chip.hbm_gib,
                fraction_of_hbm=round(used / (chip.hbm_gib * GIB), 4),
                fits=used <= chip.hbm_gib * GIB)
  return report


def cost_report(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of the per-chip program: its whole-program scalar entries.

  On TPU these are 'flops', 'transcendentals', 'bytes accessed' and 'optimal_seconds' (the
  cost model's step time); the per-operand entries ('bytes accessed0{}', 'utilization3{}',
  ...) are left out.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else {}
  return {str(k): float(v) for k, v in sorted((analysis or {}).items())
          if isinstance(v, (int, float)) and '{' not in str(k)}


TIME_KEYS = ('optimal_seconds', 'optimal seconds', 'seconds', 'estimated_seconds')


def step_time(costs: dict[str, float], chip: Chip) -> tuple[float | None, str]:
  """(seconds per step, where the number comes from).

  XLA's own estimate when its cost analysis has a positive one (on TPU 'optimal_seconds'; it
  comes out negative for some model-parallel programs); otherwise a roofline estimate from
  XLA's per-chip FLOPs and bytes accessed at the chip's peak rates, which leaves out the
  collectives' time (so it flatters the MFU).
  """
  why = 'XLA gave no time estimate'
  for key in TIME_KEYS:
    if key in costs:
      if costs[key] > 0:
        return costs[key], f'XLA cost model, cost_analysis()[{key!r}] (not a measurement)'
      why = f'XLA\'s {key} was {costs[key]:.4g}, not a time'
  flops, accessed = costs.get('flops', 0.0), costs.get('bytes accessed', 0.0)
  if flops <= 0 and accessed <= 0:
    return None, f'none: {why}, and no FLOPs or bytes'
  seconds = max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth)
  return seconds, (f'roofline estimate, not XLA\'s ({why}): max(XLA flops / peak bf16 FLOP/s, '
                   f'XLA bytes accessed / HBM bandwidth) per chip, no communication time')


def compile_run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds, lowers and compiles one run; returns its JSON report (see the module docstring)."""
  chip, devices = topology_devices(args.topology, args.num_slices)
  mesh_config = partitioning.MeshConfig(data=args.mesh_data, model=args.mesh_model,
                                        replica=args.num_slices, fsdp=args.fsdp)
  mesh = partitioning.make_mesh(mesh_config, devices)
  rules = mesh_config.rules()
  config = build_config(args.anchor, args.augment, args.size, args.dtype)
  chips = len(devices)
  batch = args.batch or chips
  if batch % (mesh.shape['replica'] * mesh.shape['data']):
    raise ValueError(f'--batch={batch} does not divide over the mesh\'s replica x data = '
                     f'{mesh.shape["replica"] * mesh.shape["data"]} devices.')
  report: dict[str, Any] = {
      'anchor': 'tiny' if args.size == 'tiny' else args.anchor,
      'augment': 'tiny' if args.size == 'tiny' else args.augment,
      'topology': args.topology, 'num_slices': args.num_slices, 'chip': chip.name,
      'device_kind': devices[0].device_kind, 'chips': chips,
      'processes': len({d.process_index for d in devices}),
      'mesh': dict(mesh.shape), 'rules': 'fsdp' if args.fsdp else 'standard',
      'activation_constraints': args.constrain_activations, 'remat': args.remat,
      'attention_block_size': args.attention_block_size,
      'loss_chunk_size': args.loss_chunk_size,
      'program': args.program,
      'dtype': args.dtype, 'optimizer': args.optimizer, 'batch': batch, 'length': args.length,
      'connections': [list(c) for c in config.connections(AUGMENT_NAME)],
      'versions': {name: importlib.metadata.version(name) for name in ('jax', 'jaxlib', 'libtpu')},
  }
  start = time.perf_counter()
  if args.program == 'decode':
    # Every slot read through a materialised mask: the step at a full cache of `length`
    # slots, with no loop whose trip count XLA's cost analysis would not know.
    lowered = decoding.lower_decode_step(Calm(config, decode_block_size=None), mesh, rules,
                                         batch, args.length)
    counts = {'all': count_params(nn.unbox(calm_lib.abstract_params(config)))}
    model_flops = batch * flops_lib.decode_step_flops(config, args.length, every_slot=True)
  else:
    lowered, counts = lower_train_step(config, mesh, rules, args.optimizer, batch, args.length,
                                       args.constrain_activations, args.remat,
                                       args.attention_block_size, args.loss_chunk_size)
    model_flops = flops_lib.composition_step_flops(config, batch, args.length)
  lower_seconds = time.perf_counter() - start
  report['params'] = counts
  report['model_flops'] = model_flops
  report['peak_flops_per_chip'] = chip.peak_flops
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as error:  # pylint: disable=broad-except
    report['timing_seconds'] = {'lower': round(lower_seconds, 2),
                                'compile': round(time.perf_counter() - start, 2)}
    report['compile_error'] = str(error).strip().splitlines()[0][:2000]
    report['memory_per_chip'] = {'hbm_gib': chip.hbm_gib, 'fits': False}
    # XLA's out-of-HBM message says how much its temporaries needed.
    needed = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\)', report['compile_error'])
    if needed:
      scale = {'K': 2**-20, 'M': 2**-10, 'G': 1, 'T': 2**10}[needed.group(2)]
      report['memory_per_chip']['xla_temp_gib_needed'] = float(needed.group(1)) * scale
    return report
  report['timing_seconds'] = {'lower': round(lower_seconds, 2),
                              'compile': round(time.perf_counter() - start, 2)}
  report['memory_per_chip'] = memory_report(compiled, chip)
  costs = cost_report(compiled)
  report['xla_cost_analysis_per_chip'] = costs
  seconds, source = step_time(costs, chip)
  report['step_seconds'] = seconds
  report['step_seconds_source'] = source
  report['xla_flops_per_chip_vs_model'] = (
      round(costs['flops'] * chips / model_flops, 4) if costs.get('flops') else None)
  report['mfu'] = (round(model_flops / (seconds * chips * chip.peak_flops), 4)
                   if seconds else None)
  if args.program == 'decode':
    report['tokens_per_second'] = round(batch / seconds, 2) if seconds else None
  return report


def _blocks_text(report: dict[str, Any]) -> str:
  block, chunk = report.get('attention_block_size'), report.get('loss_chunk_size')
  return ((f', attention blocks of {block}' if block else '')
          + (f', loss chunks of {chunk}' if chunk else ''))


def summary(report: dict[str, Any]) -> str:
  """A few human-readable lines about one run."""
  mesh = 'x'.join(f'{k}={v}' for k, v in report['mesh'].items())
  lines = [f'{report["anchor"]} + {report["augment"]} on {report["topology"]} '
           f'({report["chips"]} chips, {report["processes"]} hosts), mesh {mesh}, '
           f'{report["rules"]} rules'
           f'{"" if report.get("activation_constraints") else ", no activation constraints"}'
           f'{", remat " + report["remat"] if report.get("remat", "none") != "none" else ""}'
           f'{_blocks_text(report)}, '
           f'{report["dtype"]}, {report["optimizer"]}, '
           f'batch {report["batch"]} x {report["length"]}'
           f'{", one decoding step" if report.get("program") == "decode" else ""}']
  memory = report['memory_per_chip']
  if 'compile_error' in report:
    lines.append(f'compile FAILED after {report["timing_seconds"]["compile"]} s: '
                 f'{report["compile_error"][:500]}')
    needed = memory.get('xla_temp_gib_needed')
    if needed:
      lines.append(f'XLA needed {needed:.2f} GiB of temporaries per chip; HBM is '
                   f'{memory["hbm_gib"]} GiB')
    if report['rules'] == 'standard':
      lines.append('try --fsdp: frozen parameters sharded over the data axis too')
    lines.append('fewer sequences per chip (--batch, or --mesh-model to split heads and MLP) or '
                 'a shorter --length cut the activations')
    return '\n'.join(lines)
  lines.append(f'memory per chip: {memory["total_gib"]:.2f} GiB of {memory["hbm_gib"]} GiB '
               f'({"fits" if memory["fits"] else "does NOT fit"}; argument '
               f'{memory["argument_bytes"] / GIB:.2f}, output {memory["output_bytes"] / GIB:.2f}'
               f', alias {memory["alias_bytes"] / GIB:.2f}, temp {memory["temp_bytes"] / GIB:.2f}'
               f', code {memory["generated_code_bytes"] / GIB:.3f} GiB)')
  seconds, mfu = report['step_seconds'], report['mfu']
  seconds_text = 'n/a' if seconds is None else f'{seconds * 1e3:.4g} ms'
  mfu_text = 'n/a' if mfu is None else f'{100 * mfu:.1f}%'
  lines.append(f'step time: {seconds_text} [{report["step_seconds_source"]}]')
  lines.append(f'model FLOPs {report["model_flops"]:.4g}; MFU at that time {mfu_text}')
  if report.get('tokens_per_second'):
    lines.append(f'{report["tokens_per_second"]:.1f} tokens/s ({report["batch"]} rows per step)')
  lines.append(f'lower {report["timing_seconds"]["lower"]} s, compile '
               f'{report["timing_seconds"]["compile"]} s')
  return '\n'.join(lines)


def _run_key(report: dict[str, Any]) -> tuple:
  return tuple(json.dumps(report.get(k), sort_keys=True) for k in (
      'anchor', 'augment', 'topology', 'num_slices', 'mesh', 'rules', 'activation_constraints',
      'remat', 'attention_block_size', 'loss_chunk_size', 'program', 'dtype', 'optimizer', 'batch', 'length'))


def add_to_results(path: str, report: dict[str, Any]) -> None:
  """Adds `report` to the {'runs': [...]} file at `path`, replacing a run of the same setup."""
  runs = []
  if os.path.exists(path):
    with open(path) as f:
      runs = json.load(f).get('runs', [])
  runs = [r for r in runs if _run_key(r) != _run_key(report)] + [report]
  with open(path, 'w') as f:
    json.dump({'runs': runs}, f, indent=1)
    f.write('\n')


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--anchor', default='gemma2_9b', help='anchor preset (calm_jax.presets)')
  parser.add_argument('--augment', default='gemma2_2b', help='augment preset')
  parser.add_argument('--size', default='preset', choices=('preset', 'tiny'),
                      help='tiny: a small built-in composition instead of the presets')
  parser.add_argument('--topology', required=True,
                      help='v5e:AxB, v6e:AxB, v5p:AxBxC or v4:AxBxC (module docstring)')
  parser.add_argument('--num-slices', type=int, default=1,
                      help='slices of --topology; the mesh replica axis spans them')
  parser.add_argument('--batch', type=int, default=0,
                      help='global batch in sequences; default one per chip')
  parser.add_argument('--length', type=int, default=2048, help='tokens per sequence')
  parser.add_argument('--mesh-data', type=int, default=-1, help='data axis; -1: the rest')
  parser.add_argument('--mesh-model', type=int, default=1, help='model (tensor-parallel) axis')
  parser.add_argument('--fsdp', action='store_true',
                      help='FSDP rules: parameters sharded over the data axis too')
  parser.add_argument('--constrain-activations', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='apply the model\'s activation sharding constraints, as calm-train '
                           'does (--no-constrain-activations: leave them to XLA, to compare)')
  parser.add_argument('--remat', default='none', choices=REMAT_CHOICES,
                      help='rematerialise the anchor layers above the first bridge '
                           '(full: keep nothing; dots: keep the weight matmuls)')
  parser.add_argument('--attention-block-size', type=int, default=None,
                      help='blocked (flash-style) attention over blocks of this many keys '
                           '(default: materialised masks)')
  parser.add_argument('--loss-chunk-size', type=int, default=None,
                      help='the loss\'s logits this many positions at a time, recomputed in '
                           'the backward pass (default: all [B, T, V] logits at once)')
  parser.add_argument('--program', default='train', choices=('train', 'decode'),
                      help='train: the composition step; decode: one cached decoding step of '
                           'the composition, one token per row, at a full cache of --length '
                           'slots')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                      help='parameter and compute dtype of every model')
  parser.add_argument('--optimizer', default='adamw', choices=optim.OPTIMIZERS)
  parser.add_argument('--output', help='write this run\'s JSON report here')
  parser.add_argument('--results', help='add the report to this {"runs": [...]} JSON file')
  args = parser.parse_args(argv)
  try:
    parse_topology(args.topology)
  except ValueError as error:
    parser.error(str(error))
  if args.size == 'preset':
    for name in (args.anchor, args.augment):
      if name not in presets.PRESETS:
        parser.error(f'unknown preset {name!r}; available: {", ".join(sorted(presets.PRESETS))}')
  if args.num_slices < 1 or args.length < 1 or args.batch < 0:
    parser.error('--num-slices and --length must be positive, --batch not negative.')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (module docstring)."""
  args = parse_args(argv)
  try:
    report = compile_run(args)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(summary(report), flush=True)
  text = json.dumps(report, indent=1)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text + '\n')
  else:
    print(text)
  if args.results:
    add_to_results(args.results, report)
  return 1 if 'compile_error' in report else 0


if __name__ == '__main__':
  sys.exit(main())
