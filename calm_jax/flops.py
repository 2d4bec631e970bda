"""Analytic model FLOPs of the LMs, the composition and its training step.

Conventions (a multiply-add is 2 FLOPs; only matrix products are counted, as in the usual
"6 N D" accounting; norms, softmax, activations and the optimizer update are left out):

  LM forward, per layer, B sequences of T tokens (S = T keys):
    projections   2 B T D H (N + 2 K) + 2 B T N H D
    attention     4 B N T S H        (scores and values over the full T x S square, which is
                                      what XLA computes; the causal mask does not skip work)
    MLP           2 B T D F (3 if gated else 2)
  plus the output projection 2 B T D V; the embedding lookup is free.

  Bridge block forward (augment length S = T):
    proj 2 B S E D, query 2 B T D N H, key + value 4 B S D K H, attention 4 B N T S H,
    out 2 B T N H D.

  Backward passes: a product's gradient with respect to its input costs as much as the
  forward product, and so does its gradient with respect to its weight; attention's backward
  (to queries, keys and values) costs twice its forward.

  Composition step (the minimum: nothing frozen is differentiated):
    composed forward
    + anchor layers above the first bridge and the output projection: input gradients only
      (1x their projections and MLP, 2x their attention)
    + every bridge: weight and input gradients (2x query, key, value, out; 2x attention), the
      projection's weight gradient only (1x: the augment is frozen), and the lowest bridges'
      query without input gradient (1x: nothing below them is trained).
  Full fine-tuning step of the anchor: 3x the anchor forward.

  Decoding step (one new token per row, n tokens in the sequence with it): the forward
  formulas with T = 1 new token and, per layer, S = n keys, or min(n, window) in a
  sliding-window layer (the cache is read in blocks only as far as it is written, and a
  window's ring holds its window); the augments run up to their deepest connection, every
  bridge projects its new token and attends the n augment positions. With `every_slot`, S is
  the cache length L in every layer instead (a cache read whole, through a materialised mask).
"""

from __future__ import annotations

from calm_jax.bridge import bridge_kwargs
from calm_jax.configs import CalmConfig, TransformerConfig


def _layer_parts(cfg: TransformerConfig, batch: int, length: int,
                 keys: int | None = None) -> tuple[float, float]:
  """(dense FLOPs, attention FLOPs) of one layer's forward: `length` new tokens per row, each
  attending `keys` positions (default `length`)."""
  keys = length if keys is None else keys
  tokens = batch * length
  projections = (2 * tokens * cfg.embed_dim * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads)
                 + 2 * tokens * cfg.num_heads * cfg.head_dim * cfg.embed_dim)
  mlp = 2 * tokens * cfg.embed_dim * cfg.mlp_dim * (3 if cfg.gated_mlp else 2)
  attention = 4 * batch * cfg.num_heads * length * keys * cfg.head_dim
  return float(projections + mlp), float(attention)


def lm_forward_flops(cfg: TransformerConfig, batch: int, length: int,
                     num_layers: int | None = None, logits: bool = True,
                     keys: int | None = None) -> float:
  """Forward FLOPs of the first `num_layers` layers (default all) and the output projection.

  `keys` is the number of positions each token attends (default `length`; a decoding step
  attends its cache length).
  """
  dense, attention = _layer_parts(cfg, batch, length, keys)
  layers = cfg.num_layers if num_layers is None else num_layers
  head = 2.0 * batch * length * cfg.embed_dim * cfg.vocab_size if logits else 0.0
  return layers * (dense + attention) + head


def _bridge_parts(config: CalmConfig, name: str, batch: int, length: int,
                  keys: int | None = None) -> dict[str, float]:
  keys = length if keys is None else keys
  kw = bridge_kwargs(config, name)
  d, e = kw['anchor_dim'], kw['augment_dim']
  n, k, h = kw['num_heads'], kw['num_kv_heads'], kw['head_dim']
  tokens = batch * length
  return {'proj': 2.0 * tokens * e * d, 'query': 2.0 * tokens * d * n * h,
          'key_value': 4.0 * tokens * d * k * h, 'out': 2.0 * tokens * n * h * d,
          'attention': 4.0 * batch * n * length * keys * h}


def composed_forward_flops(config: CalmConfig, batch: int, length: int,
                           keys: int | None = None) -> float:
  """Anchor forward + each augment up to its deepest connection + every bridge.

  `keys` as in `lm_forward_flops` (the anchor's, the augments' and the bridges' attention).
  """
  total = lm_forward_flops(config.anchor, batch, length, keys=keys)
  for name, augment in config.augments:
    connections = config.connections(name)
    total += lm_forward_flops(augment, batch, length, max(a for a, _ in connections),
                              logits=False, keys=keys)
    total += len(connections) * sum(_bridge_parts(config, name, batch, length, keys).values())
  return total


def _lm_decode_flops(cfg: TransformerConfig, length: int, num_layers: int | None = None,
                     logits: bool = True) -> float:
  """One new token of a sequence of `length`, each layer attending min(length, window)."""
  layers = cfg.num_layers if num_layers is None else num_layers
  total = 2.0 * cfg.embed_dim * cfg.vocab_size if logits else 0.0
  for i in range(layers):
    window = cfg.layer_window(i)
    dense, attention = _layer_parts(cfg, 1, 1, length if window is None
                                    else min(length, window))
    total += dense + attention
  return total


def decode_step_flops(config: CalmConfig | TransformerConfig, length: int,
                      every_slot: bool = False) -> float:
  """FLOPs of one decoding step per row: the new token is the `length`-th of its sequence
  (module docstring); `every_slot`: every layer attends `length` slots (the cache's)."""
  if every_slot:
    if isinstance(config, TransformerConfig):
      return lm_forward_flops(config, 1, 1, keys=length)
    return composed_forward_flops(config, 1, 1, keys=length)
  if isinstance(config, TransformerConfig):
    return _lm_decode_flops(config, length)
  total = _lm_decode_flops(config.anchor, length)
  for name, augment in config.augments:
    connections = config.connections(name)
    total += _lm_decode_flops(augment, length, max(a for a, _ in connections), logits=False)
    total += len(connections) * sum(_bridge_parts(config, name, 1, 1, length).values())
  return total


def composition_step_flops(config: CalmConfig, batch: int, length: int) -> float:
  """The minimum FLOPs of one composition training step (see the module docstring)."""
  anchor = config.anchor
  lowest = config.first_bridged_layer()
  dense, attention = _layer_parts(anchor, batch, length)
  above = anchor.num_layers - lowest
  backward = above * (dense + 2 * attention) + 2.0 * batch * length * anchor.embed_dim * \
      anchor.vocab_size
  for name, _ in config.augments:
    parts = _bridge_parts(config, name, batch, length)
    for _, b in config.connections(name):
      backward += (parts['proj'] + 2 * parts['key_value'] + 2 * parts['out']
                   + 2 * parts['attention'] + (1 if b == lowest else 2) * parts['query'])
  return composed_forward_flops(config, batch, length) + backward


def full_finetune_step_flops(cfg: TransformerConfig, batch: int, length: int) -> float:
  """One training step of every anchor weight: 3x the forward."""
  return 3.0 * lm_forward_flops(cfg, batch, length)
