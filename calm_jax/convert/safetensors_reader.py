"""Lazy reader of Hugging Face safetensors checkpoints (single file or sharded with an index).

Tensors are memory-mapped, never loaded whole: converting a checkpoint touches one tensor at a
time. bfloat16 is read through `ml_dtypes`, so no deep-learning framework is needed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from calm_jax.checkpoints import CheckpointError

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f'{path}: not a safetensors file (too short).')
    (size,) = struct.unpack('<Q', raw)
    if size > os.path.getsize(path):
      raise CheckpointError(f'{path}: not a safetensors file (bad header length).')
    try:
      header = json.loads(f.read(size))
    except json.JSONDecodeError as e:
      raise CheckpointError(f'{path}: corrupt safetensors header ({e}).') from e
  header.pop('__metadata__', None)
  return header, 8 + size


class SafetensorsReader:
  """Read-only view of the tensors of a checkpoint directory.

  Args:
    directory: holds `model.safetensors`, or `model.safetensors.index.json` and its shards.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
        files = sorted(set(weight_map.values()))
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f'{index_path} is not a valid safetensors index ({e!r}).') from e
    elif os.path.exists(single_path):
      files = [SINGLE_FILE]
    else:
      raise CheckpointError(
          f'No weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards.')
    self._entries: dict[str, tuple[str, int, dict]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f'Weight shard {path} named in {INDEX_FILE} is missing.')
      header, offset = _read_header(path)
      size = os.path.getsize(path)
      for tensor, info in header.items():
        if offset + info['data_offsets'][1] > size:
          raise CheckpointError(f'{path} is truncated: tensor {tensor} lies past its end.')
        self._entries[tensor] = (path, offset, info)

  def names(self) -> Iterator[str]:
    """Names of all tensors, in sorted order."""
    return iter(sorted(self._entries))

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor `name`, from the header only."""
    return tuple(self._entries[name][2]['shape'])

  def get(self, name: str) -> np.ndarray:
    """Memory-mapped, read-only array of tensor `name`."""
    path, offset, info = self._entries[name]
    if info['dtype'] not in _DTYPES:
      raise CheckpointError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}.')
    dtype = np.dtype(_DTYPES[info['dtype']])
    begin, end = info['data_offsets']
    shape = tuple(info['shape'])
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise CheckpointError(f'{path}: tensor {name} has inconsistent size in its header.')
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode='r', offset=offset + begin, shape=shape)
