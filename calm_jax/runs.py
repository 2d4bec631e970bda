"""Run directories and "load whatever CHECKPOINT names".

A composition run records in MODEL_DIR what it composes (`calm_run.json`: the frozen LM
checkpoints and the bridges), so that evaluation, inference and export need MODEL_DIR alone; its
checkpoints hold the bridges only. `load_checkpoint` accepts each kind of model directory the
project writes:

  an LM checkpoint           `config.json` + `params/` (a pretrain / finetune run's
                             `MODEL_DIR/lm`, or `calm-convert` output)
  a composition run          `calm_run.json`: its frozen models + the latest bridges
  a composed checkpoint      `calm.json` (`calm-export`, `calm_jax.composed`)
"""

from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple

from etils import epath
import flax.linen as nn

from calm_jax import alignment, checkpoints, composed, trainable, vocab
from calm_jax import calm as calm_lib
from calm_jax.calm import Calm
from calm_jax.configs import BridgeConfig, CalmConfig
from calm_jax.transformer import Transformer

CALM_RUN_FILE = 'calm_run.json'


def write_calm_run(model_dir: str | epath.Path, config: CalmConfig, anchor_checkpoint: str,
                   augment_checkpoints: Mapping[str, str],
                   augment_vocabularies: Mapping[str, Any] | None = None) -> None:
  """Records in MODEL_DIR what a composition run composes, so eval/export need MODEL_DIR only.

  `augment_vocabularies`: {augment: its own vocabulary} of the `config.own_tokenizer`
  augments, copied into MODEL_DIR (`alignment.save_vocabulary`).

  Raises:
    ValueError: an own-tokenizer augment without its vocabulary, or the reverse.
  """
  vocabularies = dict(augment_vocabularies or {})
  if set(vocabularies) != set(config.own_tokenizer):
    raise ValueError(f'own-tokenizer augments {list(config.own_tokenizer)} need their '
                     f'vocabularies; got vocabularies of {sorted(vocabularies)}.')
  document = {
      'anchor_checkpoint': str(anchor_checkpoint),
      'augment_checkpoints': {k: str(v) for k, v in augment_checkpoints.items()},
      'bridges': {name: b.to_dict() for name, b in config.bridges},
      'augment_as_encoder': config.augment_as_encoder,
      'own_tokenizer': list(config.own_tokenizer),
      'augment_vocabularies': {name: alignment.save_vocabulary(v, model_dir, name)
                               for name, v in sorted(vocabularies.items())},
  }
  (epath.Path(model_dir) / CALM_RUN_FILE).write_text(json.dumps(document, indent=2))


def read_calm_run(model_dir: str | epath.Path, *, shardings: Any = None
                  ) -> tuple[CalmConfig, dict[str, Any]]:
  """(CalmConfig, the frozen parameters) of a composition run directory.

  Args:
    model_dir: the run's MODEL_DIR.
    shardings: None: each frozen LM whole, on this process's first local device. Else a
      function of the `Calm` returning the shardings of its parameters (unboxed, the tree of
      `calm.abstract_params`): then only what the composition reads is restored (an augment's
      head and its layers above the deepest connection are never read), each array straight
      into its sharding.
  """
  config = calm_run_config(model_dir)
  document = json.loads((epath.Path(model_dir) / CALM_RUN_FILE).read_text())
  abstract = placed = None
  if shardings is not None:
    abstract = nn.unbox(calm_lib.abstract_params(config))
    placed = shardings(Calm(config))

  def load(path, lm_config, part):  # part: the LM's subtree of a composition tree.
    return checkpoints.load_lm(path, config=lm_config,
                               select=None if abstract is None else part(abstract),
                               shardings=None if placed is None else part(placed))[1]

  augment_configs = dict(config.augments)
  return config, {
      'anchor': load(document['anchor_checkpoint'], config.anchor, lambda t: t['anchor']),
      'augments': {name: load(path, augment_configs[name], lambda t, n=name: t['augments'][n])
                   for name, path in document['augment_checkpoints'].items()}}


def calm_run_config(model_dir: str | epath.Path) -> CalmConfig:
  """The `CalmConfig` of a composition run directory (only the LMs' configs are read)."""
  document = json.loads((epath.Path(model_dir) / CALM_RUN_FILE).read_text())
  return CalmConfig(
      anchor=checkpoints.load_lm_config(document['anchor_checkpoint']),
      augments={name: checkpoints.load_lm_config(path)
                for name, path in document['augment_checkpoints'].items()},
      bridges={k: BridgeConfig.from_dict(v) for k, v in document['bridges'].items()},
      augment_as_encoder=document['augment_as_encoder'],
      own_tokenizer=tuple(document.get('own_tokenizer', ())))


class Loaded(NamedTuple):
  """A model ready to decode.

  Attributes:
    model: the flax module (`Transformer` or `Calm`).
    params: its parameters.
    description: what was loaded, for logs.
    step: the training step of the checkpoint (0 where unknown).
    vocabulary: the model's own vocabulary where it carries one: the exported vocabulary of a
      composed checkpoint, the `vocab.model` of an LM checkpoint (GGUF imports) or of a
      composition's anchor; else None.
    augment_vocabularies: {augment: its own vocabulary} of the augments that read their own
      tokenization (`CalmConfig.own_tokenizer`); empty otherwise.
  """

  model: Any
  params: Any
  description: str
  step: int
  vocabulary: Any = None
  augment_vocabularies: Mapping[str, Any] = {}


def load_checkpoint(checkpoint: str | epath.Path, *, shardings: Any = None) -> Loaded:
  """Loads an LM checkpoint, a composition run directory or a composed checkpoint.

  Every kind is verified against its manifest before it is restored, and refused if it holds
  a NaN or an infinity: nothing is evaluated or exported from a corrupt state.

  Args:
    checkpoint: the directory (local or `gs://`).
    shardings: None: every parameter on this process's first local device. Else a function
      of the model (`Transformer` or `Calm`) returning the shardings of its parameters
      (unboxed, the tree of `decoding.abstract_params_of`; e.g. `decoding.mesh_placement`):
      each parameter is restored straight into its sharding, each process reading only its
      own shards, and only what the model reads is restored.

  Raises:
    checkpoints.CorruptCheckpointError: one line naming the checkpoint and the bad file.
    checkpoints.CheckpointError: missing or not a checkpoint.
  """
  loaded = _load(epath.Path(checkpoint), shardings)
  checkpoints.check_finite(loaded.params, loaded.description)
  return loaded


def _load(path: epath.Path, shardings: Any) -> Loaded:
  if (path / CALM_RUN_FILE).exists():
    config, frozen = read_calm_run(path, shardings=shardings)
    checkpointer = checkpoints.RunCheckpointer(path)
    step = checkpointer.latest_step()
    bridges = checkpointer.restore_params(
        sharding=None if shardings is None else shardings(Calm(config)))
    document = json.loads((path / CALM_RUN_FILE).read_text())
    return Loaded(Calm(config), trainable.merge_params(bridges, frozen),
                  f'composition {path} step {step}', int(step or 0),
                  _lm_vocabulary(document['anchor_checkpoint']),
                  read_augment_vocabularies(path, document.get('augment_vocabularies', {})))
  if composed.is_composed(path):
    loaded = composed.load_composed(
        path, shardings=None if shardings is None else (lambda c: shardings(Calm(c))))
    step = int(loaded.metadata.get('step', 0))
    return Loaded(loaded.model, loaded.params, f'composed checkpoint {path}', step,
                  loaded.vocabulary, dict(loaded.augment_vocabularies))
  if (path / checkpoints.CONFIG_FILE).exists():
    config, params = checkpoints.load_lm(
        path, shardings=None if shardings is None else (lambda c: shardings(Transformer(c))))
    return Loaded(Transformer(config), params, f'LM {path}', 0, _lm_vocabulary(path))
  if not path.exists():
    raise checkpoints.CheckpointError(f'Checkpoint {path} does not exist.')
  raise checkpoints.CheckpointError(
      f'{path} is neither an LM checkpoint ({checkpoints.CONFIG_FILE}), a composition run '
      f'({CALM_RUN_FILE}) nor a composed checkpoint ({composed.CONFIG_FILE}).')


def read_augment_vocabularies(directory: str | epath.Path, recorded: Mapping[str, str]
                              ) -> dict[str, Any]:
  """{augment: vocabulary} of the files `recorded` ({augment: path relative to directory}).

  Raises:
    checkpoints.CheckpointError: a recorded vocabulary file is missing.
  """
  out = {}
  for name, relative in recorded.items():
    path = epath.Path(directory) / relative
    if not path.exists():
      raise checkpoints.CheckpointError(f'{directory}: the vocabulary of augment {name!r} '
                                        f'({relative}) is missing.')
    out[name] = alignment.resolve_vocabulary(path)
  return out


def _lm_vocabulary(path: str | epath.Path) -> Any:
  return vocab.load_vocabulary(path) if vocab.has_vocabulary(path) else None
