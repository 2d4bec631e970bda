"""Parameter trees: the trainable set by path, the two halves put back together, their size.

Paths are '/'-joined keys, e.g. 'bridge/kv/block_0/query' or 'anchor/layer_3/attn/query'.
A composition trains r'^bridge/'; LoRA or full fine-tuning baselines pick other patterns, and
the same train step serves all of them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from flax import traverse_util

FULL_ANCHOR = (r'^anchor/',)


def split_params(params: Any, trainable: Sequence[str]) -> tuple[dict, dict]:
  """Splits a parameter tree into (trained, frozen) nested dicts.

  Args:
    params: nested dict of arrays (unboxed).
    trainable: regular expressions; a leaf whose path matches any of them is trained.

  Raises:
    ValueError: if no leaf is trainable (a typo in a pattern would otherwise train nothing).
  """
  patterns = [re.compile(p) for p in trainable]
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  trained = {k: v for k, v in flat.items() if any(p.search(k) for p in patterns)}
  if not trained:
    raise ValueError(f'No parameter matches the trainable patterns {list(trainable)}; paths '
                     f'look like {sorted(flat)[:3]}.')
  frozen = {k: v for k, v in flat.items() if k not in trained}
  return (traverse_util.unflatten_dict(trained, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(trained: Any, frozen: Any) -> dict:
  """Inverse of `split_params`: one tree with the leaves of both."""
  flat = traverse_util.flatten_dict(dict(frozen), sep='/')
  overlap = set(flat) & set(traverse_util.flatten_dict(dict(trained), sep='/'))
  if overlap:
    raise ValueError(f'Parameters both trained and frozen: {sorted(overlap)[:5]}.')
  flat.update(traverse_util.flatten_dict(dict(trained), sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def count_params(tree: Any) -> int:
  """Number of elements of a parameter tree of arrays or shape structs (boxed or not)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
