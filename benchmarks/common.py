"""What the benchmarks share: model sizes, XLA's FLOP count, the report's header and its file.

The scripts import it as a sibling module (`python benchmarks/<name>.py` puts this directory
first on `sys.path`; they also add it themselves when imported by path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import jax

from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.trainable import count_params

# Anchor and augment per size; bridges every 4th augment layer.
MODELS = {
    # Anchor ~38M, augment ~15M parameters, 3 bridges.
    'toy': dict(anchor=dict(embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=8,
                            head_dim=64, mlp_dim=2048),
                augment=dict(embed_dim=256, num_layers=12, num_heads=4, num_kv_heads=4,
                             head_dim=64, mlp_dim=1024),
                vocab=8192),
    # What CI runs.
    'small': dict(anchor=dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                              head_dim=32, mlp_dim=512),
                  augment=dict(embed_dim=64, num_layers=8, num_heads=2, num_kv_heads=2,
                               head_dim=32, mlp_dim=256),
                  vocab=512),
}


def composition(size: str, zero_init_out: bool = True) -> CalmConfig:
  """The composition of a named size (`MODELS`), one augment named 'augment'."""
  spec = MODELS[size]
  anchor = TransformerConfig(vocab_size=spec['vocab'], **spec['anchor'])
  augment = TransformerConfig(vocab_size=spec['vocab'], **spec['augment'])
  return CalmConfig(anchor=anchor, augments={'augment': augment},
                    bridges={'augment': BridgeConfig(every=4, zero_init_out=zero_init_out)})


def xla_flops(compiled) -> float:
  """FLOPs XLA's cost analysis reports for a compiled program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def report_header(config: CalmConfig, frozen: Any, bridges: Any) -> dict[str, Any]:
  """The connections, parameter counts and machine of a report."""
  return {'connections': {n: config.connections(n) for n, _ in config.augments},
          'parameters': {'anchor': count_params(frozen['anchor']),
                         'augments': count_params(frozen['augments']),
                         'bridges': count_params(bridges)},
          'machine': {'platform': platform.platform(), 'device': str(jax.devices()[0]),
                      'cpu_count': os.cpu_count(), 'jax': jax.__version__}}


def parse_args(doc: str, sizes: list[str], name: str, argv=None) -> argparse.Namespace:
  """`--size` (default 'toy') and `--output` of a benchmark's command line."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--size', choices=sizes, default='toy')
  parser.add_argument('--output', default=None,
                      help=f'JSON path; default benchmarks/results/{name}_<size>.json')
  return parser.parse_args(argv)


def write_report(report: dict[str, Any], output: str | None, name: str, size: str) -> str:
  """Writes `report` as JSON to `output` (default benchmarks/results/{name}_{size}.json)."""
  output = output or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                  f'{name}_{size}.json')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w') as f:
    json.dump(report, f, indent=2)
  return output
