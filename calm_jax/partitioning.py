"""Device meshes, logical axis rules and the shardings of parameters, optimizer state and batches.

Mesh axes (T5X's names plus an outer one): `replica` across slices (data parallel over the
data-centre network), `data` (data parallel; with the FSDP rule set also the parameters' axis)
and `model` (tensor parallel). Model code names logical axes only; `logical_to_spec` is the one
function that turns them into mesh axes.

Logical names: T5X's `batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`, plus
`augment_embed` (a bridge's input width E). An unknown logical name is an error, never silent
replication. Rules are tried in order per name; a candidate is skipped if its mesh axes are
already used by another dimension of the same array or do not divide that dimension (for
example 2 kv heads over a model axis of 4), so a name can fall back to replication.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('replica', 'data', 'model')

Rules = tuple[tuple[str, Any], ...]

# Activations and parameters: batch over replicas x data, model-parallel heads / MLP / vocab.
STANDARD_RULES: Rules = (
    ('batch', ('replica', 'data')),
    ('length', None),
    ('embed', None),
    ('augment_embed', None),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('kv', None),
    ('mlp', 'model'),
    ('vocab', 'model'),
)

# FSDP-style: parameters' width axes are also sharded over `data` (activations keep `data` for
# the batch, which claims it first).
FSDP_RULES: Rules = (
    ('batch', ('replica', 'data')),
    ('embed', 'data'),
    ('augment_embed', 'data'),
) + STANDARD_RULES[1:]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh of a run.

  Attributes:
    data: size of the `data` axis; -1 takes every device the other axes leave.
    model: size of the `model` axis.
    replica: size of the outer `replica` axis (number of slices on multi-slice runs).
    fsdp: use FSDP_RULES (parameters sharded over `data` too) instead of STANDARD_RULES.
  """

  data: int = -1
  model: int = 1
  replica: int = 1
  fsdp: bool = False

  def rules(self) -> Rules:
    """The logical axis rules of this mesh."""
    return FSDP_RULES if self.fsdp else STANDARD_RULES

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """(replica, data, model) sizes for `num_devices` devices."""
    fixed = self.replica * self.model
    data = num_devices // fixed if self.data == -1 else self.data
    if min(self.replica, self.model, data) < 1 or fixed * data != num_devices:
      raise ValueError(f'Mesh replica={self.replica} x data={self.data} x model={self.model} '
                       f'does not fit {num_devices} devices.')
    return self.replica, data, self.model


def make_mesh(config: MeshConfig = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes MESH_AXES over `devices` (default: all), slices along `replica`."""
  devices = list(jax.devices() if devices is None else devices)
  replica, data, model = config.shape(len(devices))
  if len({getattr(d, 'slice_index', 0) for d in devices}) > 1:
    array = mesh_utils.create_hybrid_device_mesh((1, data, model), (replica, 1, 1), devices)
  else:
    try:
      array = mesh_utils.create_device_mesh((replica, data, model), devices)
    except (ValueError, NotImplementedError, AssertionError):
      array = np.asarray(devices).reshape(replica, data, model)
  return Mesh(array, MESH_AXES)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions carry logical `names`.

  Args:
    names: one logical name (or None: replicated) per dimension.
    rules: (logical name, mesh axis / tuple of axes / None) in priority order.
    mesh: with `shape`, candidates that do not divide a dimension are skipped.
    shape: the array's shape.

  Raises:
    ValueError: for a logical name without a rule.
  """
  by_name: dict[str, list[Any]] = {}
  for name, axes in rules:
    by_name.setdefault(name, []).append(axes)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in by_name:
      raise ValueError(f'Unknown logical axis name {name!r}: no rule maps it (rules name '
                       f'{sorted(by_name)}).')
    chosen = None
    for axes in by_name[name]:
      if axes is None:
        break
      group = (axes,) if isinstance(axes, str) else tuple(axes)
      if used & set(group):
        continue
      if mesh is not None and shape is not None:
        group = tuple(a for a in group if mesh.shape[a] > 1)  # Size-1 axes shard nothing.
        if not group or shape[dim] % _axis_size(mesh, group):
          continue
      chosen = group
      break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def param_shardings(abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings (unboxed tree) of a boxed abstract parameter tree (`jax.eval_shape`)."""
  def sharding(leaf):
    if not _is_boxed(leaf):
      raise ValueError(f'Parameter of shape {leaf.shape} has no logical axis names.')
    return NamedSharding(mesh, logical_to_spec(leaf.names, rules, mesh, leaf.value.shape))
  return jax.tree.map(sharding, abstract, is_leaf=_is_boxed)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` (arrays or structs, unboxed) carrying `shardings`: the
  arguments of a program lowered from shapes alone."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                        shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `optimizer`'s state: a parameter's sharding for its same-shape moments,
  replicated for everything else (counts, Adafactor's factored statistics)."""
  abstract_params = nn.unbox(abstract_params)
  state = jax.eval_shape(optimizer.init, abstract_params)

  def pick(leaf, param, sharding):
    if getattr(leaf, 'shape', None) == param.shape:
      return sharding
    return replicated(mesh)

  return optax.tree_map_params(optimizer, pick, state, abstract_params, shardings,
                               transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [B, T] batch features: batch over its rule's axes, length replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), rules))


def batch_rows(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch is split on `mesh` (the size of the batch rule's axes): a
  global batch must be a multiple of it."""
  return _axis_size(mesh, logical_to_spec(('batch',), rules)[0])


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Rules) -> dict[str, jax.Array]:
  """Assembles each process's share of the batch into global arrays (JAX's multi-process API).

  Args:
    local: this process's rows of every feature [B / process_count, ...].
    mesh: the run's mesh.
    rules: its logical axis rules.
  """
  out = {}
  for name, value in local.items():
    spec = logical_to_spec(('batch',) + (None,) * (np.ndim(value) - 1), rules)
    out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
  return out


CACHE_NAMES = ('batch', 'length', 'kv_heads', 'kv')


def cache_spec(shape: Sequence[int], rules: Rules, mesh: Any) -> PartitionSpec:
  """The PartitionSpec of a [B, L, K, H] decoding cache of keys or values on `mesh` (a mesh
  or an abstract mesh): ('batch', 'length', 'kv_heads', 'kv') under `rules`, except that
  where the K heads do not divide over the axes `kv_heads` maps to (Gemma-2-9B's 8 on a
  model axis of 16), the head dimension H is split over them instead."""
  heads = [('kv', axes) for name, axes in rules if name == 'kv_heads' and axes is not None]
  return logical_to_spec(CACHE_NAMES, heads + list(rules), mesh, shape)


def constrain_query_to_cache(q: jax.Array, cache_shape: Sequence[int]) -> jax.Array:
  """Queries [B, T, N, H] split along H where a [B, L, K, H] cache is (`cache_spec`), inside
  `activation_context`; elsewhere `q` unchanged.

  With the cache's H split across devices, so must be the queries' for the scores: each
  device then sums its share of H and the [B, heads, T, L] scores are all-reduced, where XLA
  left to itself gathers the whole cache of the layer onto every device.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty or 'kv' not in {n for n, _ in rules}:
    return q
  spec = cache_spec(cache_shape, rules, mesh)
  if spec[3] is None:
    return q
  return jax.lax.with_sharding_constraint(q, PartitionSpec(spec[0], None, None, spec[3]))


@contextlib.contextmanager
def activation_context(mesh: Mesh | None, rules: Rules | None):
  """Makes the model's `nn.with_logical_constraint` calls on activations take effect.

  Flax's constraints are no-ops unless logical axis rules and a mesh are in context. Enter this
  while *tracing* a step (inside the jitted function: it sets the abstract mesh only, which
  works under a trace) so that activations follow `rules` on `mesh`: with the FSDP rules, for
  example, the [batch, length, embed] residual stream stays sharded by batch instead of XLA
  choosing to shard it along the width. `mesh=None` or `rules=None` does nothing.
  """
  if mesh is None or rules is None:
    yield
    return
  with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def sharding_listing(shardings: Any) -> dict[str, str]:
  """{parameter path: its PartitionSpec as text, trailing Nones dropped}, for tests and logs."""
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  listing = {}
  for path, sharding in flat:
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
      spec.pop()
    listing[jax.tree_util.keystr(path)] = str(tuple(spec))
  return listing
