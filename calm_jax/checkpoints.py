"""LM checkpoints: an orbax directory of parameters plus the `TransformerConfig` as JSON.

Layout of an LM checkpoint directory (local or `gs://`):
  config.json   {"format": "calm_jax.lm/1", "config": {...}, "metadata": {...},
                 "files": {path: {"size", "sha256"}} of params/ (`calm_jax.integrity`)}
  params/       orbax StandardCheckpointer tree of the (unboxed) parameters

`config.json` is written last, so a directory without it is an incomplete checkpoint.
Loading verifies every file against `files` first (a flipped byte or a truncated file is one
`CorruptCheckpointError` naming it), then restores straight into device arrays of the
requested shardings: there is no second full copy of the parameters in host memory.

`RunCheckpointer` keeps a training run's checkpoints, each sealed by a manifest once orbax has
finished writing it; a resume takes the newest one that is intact and finite.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from calm_jax import integrity
from calm_jax.configs import TransformerConfig
from calm_jax.transformer import abstract_params

FORMAT = 'calm_jax.lm/1'
CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed or does not match the expected model."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files differ from what was written, or it holds non-finite values."""


def check_files(path: str | epath.Path, document: Mapping[str, Any], what: str,
                verify: bool = True) -> None:
  """Verifies the files of checkpoint `path` against its document's manifest (`"files"`).

  A document written before manifests existed is loaded with a warning.

  Raises:
    CorruptCheckpointError: naming the checkpoint and the first file that does not match.
  """
  if not verify:
    return
  files = document.get('files')
  if files is None:
    logging.warning('%s %s has no file checksums (written by an older calm_jax); '
                    'its files are not verified.', what, path)
    return
  found = integrity.problems(path, files)
  if found:
    raise CorruptCheckpointError(f'{what} {path} is corrupt: {integrity.summary(found)}.')


def nonfinite_leaves(tree: Any) -> list[str]:
  """Key paths of the floating-point leaves of `tree` holding a NaN or an infinity.

  One jitted reduction for the whole tree (sharded arrays stay where they are).
  """
  leaves = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(getattr(v, 'dtype', np.int32), jnp.inexact)}
  if not leaves:
    return []
  flags = jax.device_get(jax.jit(
      lambda t: {k: jnp.all(jnp.isfinite(v)) for k, v in t.items()})(leaves))
  return sorted(k for k, ok in flags.items() if not ok)


def check_finite(tree: Any, where: str) -> None:
  """Raises a CorruptCheckpointError if `tree` holds a NaN or an infinity, naming the leaf."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise CorruptCheckpointError(f'{where} holds non-finite values (NaN or inf) in {bad[0]}'
                                 f'{f" and {len(bad) - 1} more" if len(bad) > 1 else ""}; '
                                 f'it cannot be used.')


def save_lm(path: str | epath.Path, config: TransformerConfig, params: Any,
            metadata: Mapping[str, Any] | None = None) -> None:
  """Writes an LM checkpoint.

  Args:
    path: target directory; must not hold a checkpoint already.
    config: the architecture of `params`.
    params: parameter tree (boxed or not) of numpy or jax arrays; sharded arrays are written
      by every process (all processes call this).
    metadata: JSON-serialisable provenance stored beside the config.
  """
  path = epath.Path(path)
  check_new_lm_dir(path)
  check_tree(params, flat_paths(abstract_params(config)), str(path))
  path.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(orbax_path(path / PARAMS_DIR), nn.unbox(params))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:  # Every process wrote its shards; one writes the config.
    document = {'format': FORMAT, 'config': config.to_dict(), 'metadata': dict(metadata or {}),
                'files': integrity.manifest(path, parts=[PARAMS_DIR])}
    tmp = path / (CONFIG_FILE + '.tmp')
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True))
    tmp.replace(path / CONFIG_FILE)


def check_new_lm_dir(path: str | epath.Path) -> None:
  """Raises a CheckpointError if `path` already holds (part of) an LM checkpoint."""
  path = epath.Path(path)
  if (path / CONFIG_FILE).exists() or (path / PARAMS_DIR).exists():
    raise CheckpointError(f'{path} already holds a checkpoint; choose a new directory.')


def orbax_path(path: str | epath.Path) -> epath.Path:
  """`path` as orbax wants it: absolute if local; remote (`gs://`) paths pass through."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.resolve()


def stored_tree(directory: str | epath.Path) -> Any:
  """The tree of shape/dtype metadata of the orbax checkpoint in `directory` (no data read)."""
  metadata = ocp.StandardCheckpointer().metadata(orbax_path(directory))
  metadata = getattr(metadata, 'item_metadata', metadata)
  return getattr(metadata, 'tree', metadata)


def flat_paths(tree: Any) -> dict[str, Any]:
  """{key path: leaf} of a parameter tree (boxed trees are unboxed first)."""
  return {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


def check_tree(tree: Any, required: Mapping[str, Any], where: str,
               allowed: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Raises a CheckpointError naming the first parameter of `tree` that does not fit.

  Args:
    tree: the parameters (arrays, shape structs or orbax metadata).
    required: {key path: leaf with a shape} that `tree` must hold (`flat_paths`).
    where: the checkpoint, for messages.
    allowed: the paths it may hold (a superset of `required`); default `required`.

  Returns:
    {key path: the expected leaf} of every parameter in `tree`.
  """
  allowed = required if allowed is None else allowed
  actual = {k: tuple(getattr(v, 'shape', ())) for k, v in flat_paths(tree).items()}
  missing, extra = sorted(set(required) - set(actual)), sorted(set(actual) - set(allowed))
  if missing or extra:
    raise CheckpointError(f'{where}: parameters do not match the config: missing {missing[:5]}, '
                          f'unexpected {extra[:5]}.')
  for key, shape in actual.items():
    if shape != tuple(allowed[key].shape):
      raise CheckpointError(f'{where}: parameter {key} has shape {shape}, the config needs '
                            f'{tuple(allowed[key].shape)}.')
  return {key: allowed[key] for key in actual}


def read_document(path: str | epath.Path, file_name: str, fmt: str, what: str) -> dict[str, Any]:
  """The parsed JSON `file_name` of the checkpoint directory `path`, with clear errors.

  Args:
    path: the checkpoint directory.
    file_name: its JSON file, written last (its absence means an incomplete checkpoint).
    fmt: the expected value of the document's "format".
    what: the kind of checkpoint, for messages.
  """
  path = epath.Path(path)
  file = path / file_name
  if not file.exists():
    if not path.exists():
      raise CheckpointError(f'{what} {path} does not exist.')
    hint = ''
    if (path / 'lm' / file_name).exists():
      hint = f' It is a run directory: did you mean {path / "lm"}?'
    elif (path / 'calm_run.json').exists():
      hint = ' It is a composition run directory (MODEL_DIR of calm-train compose).'
    raise CheckpointError(f'{path} has no {file_name}: not a (complete) {what}.{hint}')
  try:
    document = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{file} is not valid JSON ({e}).') from e
  if document.get('format') != fmt:
    raise CheckpointError(f'{file}: unknown format {document.get("format")!r}, want {fmt}.')
  return document


def load_lm_config(path: str | epath.Path,
                   expected: TransformerConfig | None = None) -> TransformerConfig:
  """Reads the `TransformerConfig` of the LM checkpoint at `path`.

  Raises:
    CheckpointError: `expected` is given and the stored config differs (naming the fields).
  """
  document = read_document(path, CONFIG_FILE, FORMAT, 'LM checkpoint')
  return _expected(path, TransformerConfig.from_dict(document['config']), expected)


def _expected(path: Any, stored: TransformerConfig,
              expected: TransformerConfig | None) -> TransformerConfig:
  if expected is not None and expected != stored:
    raise CheckpointError(f'LM checkpoint {path} does not match the expected model: '
                          f'(stored, expected) = {stored.differences(expected)}.')
  return stored


def lm_fingerprint(path: str | epath.Path) -> str:
  """SHA-256 of an LM checkpoint's `config.json`, which holds its files' checksums: a change
  of architecture or weights changes it."""
  return integrity.file_digest(epath.Path(path) / CONFIG_FILE)


def load_lm(path: str | epath.Path, *, config: TransformerConfig | None = None,
            shardings: Any = None, verify: bool = True, select: Any = None
            ) -> tuple[TransformerConfig, Any]:
  """Restores an LM checkpoint straight into device arrays, after verifying its files.

  Args:
    path: the LM checkpoint directory (local or `gs://`).
    config: if given, the architecture the caller expects; a different stored config is an error.
    shardings: a `jax.sharding.Sharding` for every leaf, a tree of them matching the
      parameters (or `select`), or a function of the stored config returning either; default:
      the first local device.
    verify: check every file's size and SHA-256 first (reads the checkpoint once more).
    select: restore only these parameters: an (unboxed) tree of arrays or shape structs whose
      paths are a subset of the model's, e.g. a frozen augment's layers up to its deepest
      connection (`calm.abstract_params(...)['augments'][name]`); the rest is never read.

  Returns:
    (config, params) with params a plain (unboxed) tree of `jax.Array`s.

  Raises:
    CorruptCheckpointError: a file differs from what was written.
    CheckpointError: missing, malformed or of another architecture.
  """
  path = epath.Path(path)
  document = read_document(path, CONFIG_FILE, FORMAT, 'LM checkpoint')
  stored = _expected(path, TransformerConfig.from_dict(document['config']), config)
  params_path = path / PARAMS_DIR
  if not params_path.exists():
    raise CheckpointError(f'{path} has no {PARAMS_DIR}/ directory.')
  check_files(path, document, 'LM checkpoint', verify)
  abstract = nn.unbox(abstract_params(stored))
  check_tree(stored_tree(params_path), flat_paths(abstract), str(path))
  if callable(shardings):
    shardings = shardings(stored)
  if select is not None:
    abstract = _selected(abstract, select, str(path))
  return stored, restore_tree(params_path, restore_target(abstract, shardings))


def _selected(abstract: Any, select: Any, where: str) -> Any:
  """`abstract`'s leaves at the paths of `select` (its shapes checked against them)."""
  full = flat_paths(abstract)
  unknown = sorted(set(flat_paths(select)) - set(full))
  if unknown:
    raise CheckpointError(f'{where}: the model reads parameters the checkpoint\'s '
                          f'architecture lacks: {unknown[:5]}.')
  return jax.tree_util.tree_map_with_path(
      lambda k, leaf: _same_shape(full[jax.tree_util.keystr(k)], leaf, k, where), select)


def _same_shape(stored: Any, wanted: Any, key: Any, where: str) -> Any:
  if tuple(stored.shape) != tuple(wanted.shape):
    raise CheckpointError(f'{where}: parameter {jax.tree_util.keystr(key)} has shape '
                          f'{tuple(stored.shape)}, the model reads {tuple(wanted.shape)}.')
  return stored


def restore_tree(directory: str | epath.Path, target: Any) -> Any:
  """Restores the leaves of `target` (shape structs with shardings, `restore_target`) from
  the orbax checkpoint in `directory`: each array straight into its sharding, each process
  reading its own shards; stored entries `target` does not name are not read."""
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      target)
  return ocp.PyTreeCheckpointer().restore(
      orbax_path(directory),
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))


def by_path(tree: Any, values: Any) -> Any:
  """The tree of `tree`'s structure holding, at each leaf, the leaf of `values` at the same
  key path (`values` may hold more: e.g. a composition's shardings for its trained part)."""
  flat = flat_paths(values)
  return jax.tree_util.tree_map_with_path(lambda k, _: flat[jax.tree_util.keystr(k)], tree)


def restore_target(abstract: Any, shardings: Any = None) -> Any:
  """The orbax restore target: `abstract`'s shapes and dtypes in `shardings`.

  Args:
    abstract: a tree of arrays or shape/dtype structs (unboxed).
    shardings: one `jax.sharding.Sharding` for every leaf, a matching tree of them, or None
      for this process's first local device.
  """
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class RunCheckpointer:
  """Checkpoints of a training run in `model_dir/checkpoints/<step>`: trained state + data position.

  Only what the run trains is saved (for a composition: the bridges and their optimizer state,
  never the frozen models). orbax writes each step into a temporary directory and renames it
  when complete, so an interrupted save never hides the previous good checkpoint. Once a save
  has finished, its step directory is sealed with a manifest of its files' sizes and SHA-256
  (`calm_jax.integrity`); a restore verifies it first. `restore_latest` takes the newest step
  that is sealed, intact and finite, moving corrupt ones aside to `model_dir/corrupt/`.

  Args:
    model_dir: the run's directory (local or `gs://`).
    max_to_keep: checkpoints kept (older ones are deleted).
  """

  def __init__(self, model_dir: str | epath.Path, max_to_keep: int = 3):
    self._model_dir = epath.Path(model_dir)
    directory = orbax_path(self._model_dir / 'checkpoints')
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'data'))
    self._unsealed: list[int] = []

  def step_dir(self, step: int) -> epath.Path:
    """The directory of checkpoint `step`."""
    return epath.Path(self._manager.directory) / str(step)

  def latest_step(self) -> int | None:
    """The latest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def _seal(self, wait: bool) -> None:
    """Writes the manifest of every finished save (process 0), waiting for them if `wait`."""
    if not self._unsealed:
      return
    if wait:
      self._manager.wait_until_finished()
    elif self._manager.is_saving_in_progress():
      return
    if jax.process_index() == 0:
      for step in self._unsealed:
        if self.step_dir(step).exists():  # Not already rotated out by max_to_keep.
          integrity.write_manifest(self.step_dir(step))
    self._unsealed = []

  def poll(self) -> None:
    """Seals a save that finished in the background; cheap, call it every step."""
    self._seal(wait=False)

  def save(self, step: int, state: Any, batches_consumed: int) -> None:
    """Saves (asynchronously) the state and the data position at `step`."""
    self._seal(wait=True)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'batches_consumed': int(batches_consumed)})))
    self._unsealed.append(step)

  def verify(self, step: int) -> None:
    """Raises a CorruptCheckpointError if checkpoint `step` is unsealed or differs from its
    manifest, naming the step directory and the file."""
    found = integrity.verify_manifest(self.step_dir(step))
    if found:
      raise CorruptCheckpointError(f'Checkpoint {self.step_dir(step)} is corrupt: '
                                   f'{integrity.summary(found)}.')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, int]:
    """(state, batches consumed) of checkpoint `step`, restored into `abstract_state`'s layout."""
    self.verify(step)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f'Checkpoint {step} in {self._manager.directory} does not match '
                            f'this run (different model or optimizer?): {e}') from e
    check_finite(restored['state'], f'Checkpoint {self.step_dir(step)}')
    return restored['state'], int(restored['data']['batches_consumed'])

  def _set_aside(self, step: int) -> epath.Path:
    """Moves a corrupt checkpoint to `model_dir/corrupt/<step>` (kept for inspection)."""
    target = self._model_dir / 'corrupt' / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      self.step_dir(step).rename(target)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'calm_jax: checkpoint {step} set aside')
    self._manager.reload()
    return target

  def restore_latest(self, abstract_state: Any,
                     warn: Callable[[str], None] = logging.warning) -> tuple[Any, int, int] | None:
    """(state, batches consumed, step) of the newest intact checkpoint, or None if none exist.

    A checkpoint that is unsealed, differs from its manifest or holds non-finite values is
    moved to `model_dir/corrupt/` with a warning naming it, and the next older one is tried.

    Raises:
      CorruptCheckpointError: checkpoints exist but none is intact.
      CheckpointError: an intact checkpoint does not fit `abstract_state` (another run).
    """
    bad = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, consumed = self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        reason = str(e)
      else:
        return state, consumed, step
      moved = self._set_aside(step)
      warn(f'{reason} Moved it to {moved}; trying the previous checkpoint.')
      bad.append(step)
    if bad:
      raise CorruptCheckpointError(
          f'No intact checkpoint in {self._manager.directory}: steps {bad} were corrupt (moved '
          f'to {self._model_dir / "corrupt"}). Remove MODEL_DIR/checkpoints to start again.')
    return None

  def restore_params(self, step: int | None = None, sharding: Any = None) -> Any:
    """The trained parameters of checkpoint `step` (default latest); the optimizer state is
    never read.

    Works on any topology: a checkpoint a pod slice wrote restores on one host. Every array
    lands straight in its sharding: `sharding` is one `jax.sharding.Sharding` for every leaf,
    or a tree of them holding the parameters' key paths (it may hold more, e.g. the shardings
    of a whole composition, `by_path`); default: this process's first local device.

    Raises:
      CorruptCheckpointError: the checkpoint's files differ from its manifest, or its
        parameters hold non-finite values.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {self._manager.directory}.')
    self.verify(step)
    metadata = stored_tree(self.step_dir(step) / 'state')['params']
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata,
                            is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
      try:
        sharding = by_path(abstract, sharding)
      except KeyError as e:
        raise CheckpointError(f'Checkpoint {self.step_dir(step)} holds parameter {e} that '
                              f'the model does not have.') from e
    target = {'params': restore_target(abstract, sharding)}
    params = restore_tree(self.step_dir(step) / 'state', target)['params']
    check_finite(params, f'Checkpoint {self.step_dir(step)}')
    return params

  def close(self) -> None:
    """Waits for pending saves, seals them and releases resources."""
    self._seal(wait=True)
    self._manager.close()
