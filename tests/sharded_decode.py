"""Decodes on several meshes of emulated CPU devices and on one device; prints JSON.

Run as a subprocess by tests/test_sharded_decoding.py (the device count is fixed when JAX
starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_decode.py
For the composition of tests/sharded_steps.py (a window anchor layer, GQA bridges) with a
second augment, and a Gemma-2-like LM: greedy, sampled and beam-search tokens of 8 ragged
prompts per mesh, and the sharding the parameters and the output took.
"""

import dataclasses
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import calm as calm_lib
from calm_jax import decoding, partitioning
from calm_jax.calm import Calm
from calm_jax.configs import BridgeConfig, TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params

from sharded_steps import AUGMENT, CONFIG, VOCAB

SECOND = TransformerConfig(vocab_size=VOCAB, embed_dim=24, num_layers=2, num_heads=4,
                           num_kv_heads=4, head_dim=8, mlp_dim=32)
COMPOSITION = dataclasses.replace(
    CONFIG, augments={'augment': AUGMENT, 'second': SECOND},
    bridges={**dict(CONFIG.bridges),
             'second': BridgeConfig(connections=((2, 1),), zero_init_out=False)})
GEMMA_LIKE = TransformerConfig(
    vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, attention_types=('local', 'global', 'local'), sliding_window=3,
    attn_logit_softcap=50.0, final_logit_softcap=30.0, norm_plus_one=True, sandwich_norms=True,
    scale_embeddings=True, activation='gelu_tanh')
MESHES = [((1, 8, 1), False), ((1, 4, 2), False), ((1, 2, 4), False), ((1, 4, 2), True)]
BATCH, PROMPT, NEW = 8, 10, 6
MODES = {'greedy': {}, 'sampled': {'sampling': decoding.Sampling(temperature=1.0, top_k=8)},
         'beam': {'num_beams': 3, 'length_penalty': 0.6}}


def models():
  abstract = nn.unbox(calm_lib.abstract_params(COMPOSITION))
  params = random_like({'anchor': abstract['anchor'], 'augments': abstract['augments']}, 1)
  params.update(calm_lib.init_bridge_params(COMPOSITION, jax.random.key(1)))
  lm = random_like(nn.unbox(abstract_params(GEMMA_LIKE)), 2, plus_one=True)
  return {'composition': (Calm(COMPOSITION), jax.tree.map(jnp.asarray, params)),
          'lm': (Transformer(GEMMA_LIKE), jax.tree.map(jnp.asarray, lm))}


def prompts():
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, VOCAB, (BATCH, PROMPT)).astype(np.int32)
  lengths = rng.integers(1, PROMPT + 1, BATCH)
  mask = (np.arange(PROMPT)[None] < lengths[:, None]).astype(np.int32)
  return tokens, mask


def decode(model, params, mode, mesh=None, rules=None):
  fn = decoding.make_generate_fn(model, max_decode_len=NEW, eos_id=1, mesh=mesh, rules=rules,
                                 **MODES[mode])
  tokens, mask = prompts()
  if mesh is not None:
    params = decoding.shard_params(model, params, mesh, rules)
    batch = partitioning.batch_sharding(mesh, rules)
    tokens, mask = jax.device_put(tokens, batch), jax.device_put(mask, batch)
  out = fn(params, tokens, mask, jax.random.key(3))
  return out, params


def main():
  report = {'devices': jax.device_count(), 'reference': {}, 'meshes': {}}
  for name, (model, params) in models().items():
    for mode in MODES:
      report['reference'][f'{name}/{mode}'] = np.asarray(decode(model, params, mode)[0]).tolist()
  for shape, fsdp in MESHES:
    config = partitioning.MeshConfig(replica=shape[0], data=shape[1], model=shape[2], fsdp=fsdp)
    mesh, rules = partitioning.make_mesh(config), config.rules()
    key = f'{"x".join(map(str, shape))}{" fsdp" if fsdp else ""}'
    row = {}
    for name, (model, params) in models().items():
      for mode in MODES:
        out, placed = decode(model, params, mode, mesh, rules)
        row[f'{name}/{mode}'] = np.asarray(out).tolist()
      row[f'{name}/output_spec'] = [list(a) if isinstance(a, tuple) else a
                                      for a in out.sharding.spec]
      row[f'{name}/sharded_params'] = sum(
          1 for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated)
    row['lm/largest_gather'], row['lm/cache_layer'] = _gathers(mesh, rules)
    report['meshes'][key] = row
  print(json.dumps(report))


def _gathers(mesh, rules):
  """(elements of the largest all-gather of a cache-shaped [B', L, K', H'] array in the
  compiled decoding step of the Gemma-like LM, elements of one layer's key cache [B, L, K, H]):
  a step that gathered a layer's cache onto every device would show one of its batch share."""
  cache_length = PROMPT + NEW
  compiled = decoding.lower_decode_step(Transformer(GEMMA_LIKE), mesh, rules, BATCH,
                                        cache_length).compile()
  largest = 0
  for line in compiled.as_text().splitlines():
    match = re.search(r'= \w+\[([\d,]*)\][^ ]* all-gather', line)
    dims = [int(d) for d in match.group(1).split(',')] if match and match.group(1) else []
    if len(dims) == 4 and dims[1] == cache_length:
      largest = max(largest, math.prod(dims))
  layer = BATCH * cache_length * GEMMA_LIKE.num_kv_heads * GEMMA_LIKE.head_dim
  return largest, layer


if __name__ == '__main__':
  main()
