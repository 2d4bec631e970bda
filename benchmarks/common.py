"""What the benchmarks share: their model sizes and XLA's FLOP count of a compiled program.

The scripts import it as a sibling module (`python benchmarks/<name>.py` puts this directory
first on `sys.path`; they also add it themselves when imported by path).
"""

from __future__ import annotations

from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig

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
