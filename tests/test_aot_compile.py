"""launch/aot_compile.py: the composition train step compiled for a TPU topology on the CPU.

Each case runs the CLI in a subprocess (libtpu and JAX's backends are set up once per process)
for its tiny composition on a small topology, and checks the JSON report against values
computed here independently.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from calm_jax import flops
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu (the TPU compiler, in the test extra on Linux x86-64 with Python >= 3.11) '
           'is not installed: no TPU topology to compile for.')

LENGTH = 32


def tiny_config() -> CalmConfig:
  """The CLI's --size=tiny composition, written out again (bfloat16, default bridges)."""
  anchor = TransformerConfig(vocab_size=256, embed_dim=64, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128)
  augment = TransformerConfig(vocab_size=256, embed_dim=32, num_layers=8, num_heads=2,
                              num_kv_heads=2, head_dim=16, mlp_dim=64)
  anchor, augment = (dataclasses.replace(c, dtype='bfloat16', param_dtype='bfloat16')
                     for c in (anchor, augment))
  return CalmConfig(anchor=anchor, augments={'augment': augment},
                    bridges={'augment': BridgeConfig()})


def run_cli(repo_root, *args):
  """Runs the CLI; returns the completed process."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # conftest's are CPU-only.
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(repo_root), env.get('PYTHONPATH')]))
  return subprocess.run([sys.executable, str(repo_root / 'launch' / 'aot_compile.py'), *args],
                        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.parametrize('topology,mesh_args,mesh,rules', [
    ('v5e:2x2', ['--mesh-model=2'], {'replica': 1, 'data': 2, 'model': 2}, 'standard'),
    ('v4:2x2x1', ['--fsdp', '--remat=full'], {'replica': 1, 'data': 4, 'model': 1}, 'fsdp'),
])
def test_tiny_composition_compiles_for_topology(repo_root, tmp_path, topology, mesh_args, mesh,
                                                rules):
  output, results = tmp_path / 'run.json', tmp_path / 'results.json'
  proc = run_cli(repo_root, '--size=tiny', f'--topology={topology}', f'--length={LENGTH}',
                 *mesh_args, f'--output={output}', f'--results={results}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(output.read_text())
  assert json.loads(results.read_text()) == {'runs': [report]}
  assert report['chips'] == 4  # One JAX device per chip, v4 included (megacore).
  assert report['device_kind'].startswith('TPU v')
  assert report['mesh'] == mesh
  assert report['rules'] == rules
  assert report['activation_constraints'] is True  # As calm-train traces its step.
  assert report['remat'] == ('full' if '--remat=full' in mesh_args else 'none')
  assert report['batch'] == 4  # Default: one sequence per chip.
  assert report['connections'] == [[4, 2], [8, 4]]
  memory = report['memory_per_chip']
  for key in ('argument_bytes', 'output_bytes', 'generated_code_bytes', 'total_bytes'):
    assert memory[key] > 0, key
  assert memory['alias_bytes'] > 0  # The donated state is reused for the new state.
  assert memory['fits'] is True
  assert report['model_flops'] == flops.composition_step_flops(tiny_config(), 4, LENGTH)
  assert report['step_seconds'] > 0
  assert 0 < report['mfu'] < 1
  assert 'flops' in report['xla_cost_analysis_per_chip']
  assert report['versions']['libtpu']
  assert 'memory per chip' in proc.stdout


def test_unknown_topology_is_a_usage_error(repo_root):
  proc = run_cli(repo_root, '--size=tiny', '--topology=v5e:2x2x2')
  assert proc.returncode == 2
  assert 'v5e topology has 2 positive dimensions' in proc.stderr


def test_tiny_decoding_step_compiles_for_topology(repo_root, tmp_path):
  # One cached decoding step of the composition on v5e:2x2 (data 2 x model 2): the cache is
  # donated and kept in its sharding, the FLOPs are the analytic step's at a full cache.
  output = tmp_path / 'decode.json'
  proc = run_cli(repo_root, '--size=tiny', '--topology=v5e:2x2', '--mesh-model=2',
                 '--program=decode', '--batch=4', f'--length={LENGTH}', f'--output={output}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(output.read_text())
  assert report['program'] == 'decode'
  assert report['mesh'] == {'replica': 1, 'data': 2, 'model': 2}
  memory = report['memory_per_chip']
  assert memory['alias_bytes'] > 0 and memory['fits'] is True  # The donated cache.
  assert report['model_flops'] == 4 * flops.decode_step_flops(tiny_config(), LENGTH,
                                                              every_slot=True)
  assert report['step_seconds'] > 0
  assert report['tokens_per_second'] == round(4 / report['step_seconds'], 2)
  assert 'tokens/s' in proc.stdout and 'one decoding step' in proc.stdout
