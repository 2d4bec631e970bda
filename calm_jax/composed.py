"""Composed checkpoints: anchor, augments and bridges in one directory, ready to generate.

Layout (local or `gs://`):
  calm.json    {"format": "calm_jax.composed/1", "config": CalmConfig, "vocabulary": reference,
                "metadata": {...}, "files": sizes and SHA-256 of params/ and vocabulary/};
               written last, so a directory without it is incomplete; loading verifies files
  params/      orbax tree {'anchor': ..., 'augments': {name: ...}, 'bridge': {name: ...}}
  vocabulary/  a copy of the vocabulary's model file, where it has one (SentencePiece), and
               of each own-tokenizer augment's ("augment_vocabularies" in calm.json)
  serving/     optional: the generate function through `jax.export` (`generate.jax`, with
               `signature.json`), and a TF SavedModel (`saved_model/`)

  composed = calm_jax.load_composed('/tmp/calm_kv/export')
  tokens = composed.generate(input_tokens, prompt_mask, max_decode_len=8)
  texts = composed.generate_text(['k3 + k17'], max_decode_len=8)

The serving artifact takes the parameters as its first argument (they stay in `params/`, not
baked into the program), then input tokens [b, P], prompt mask [b, P] and a uint32[2] PRNG key
with a symbolic batch size b; it returns [b, max_decode_len] tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from calm_jax import calm as calm_lib
from calm_jax import decoding, partitioning
from calm_jax import transformer as transformer_lib
from calm_jax import checkpoints, integrity
from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import CalmConfig

FORMAT = 'calm_jax.composed/1'
CONFIG_FILE = 'calm.json'
PARAMS_DIR = 'params'
VOCABULARY_DIR = 'vocabulary'
SERVING_DIR = 'serving'
SERVING_FILE = 'generate.jax'
SIGNATURE_FILE = 'signature.json'
SAVED_MODEL_DIR = 'saved_model'


def vocabulary_reference(vocabulary: Any, directory: epath.Path, stem: str = ''
                         ) -> dict[str, Any] | None:
  """A JSON description of a seqio vocabulary, copying its model file into `directory`.

  Supported: SentencePiece and byte-level BPE (file copied), byte vocabularies, and any
  vocabulary class with a `reference_kwargs()` method (rebuilt as `Class(**kwargs)`, e.g.
  calm_tasks' WordVocabulary). `stem` prefixes the copied file's name (an augment's own
  vocabulary beside the anchor's).
  Anything else is an error: an export must be usable without the code that trained it.
  """
  if vocabulary is None:
    return None
  import seqio  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    (directory / VOCABULARY_DIR).mkdir(parents=True, exist_ok=True)
    target = directory / VOCABULARY_DIR / f'{stem}spm.model'
    target.write_bytes(epath.Path(vocabulary.sentencepiece_model_file).read_bytes())
    return {'type': 'sentencepiece', 'file': f'{VOCABULARY_DIR}/{stem}spm.model',
            'extra_ids': vocabulary.extra_ids}
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {'type': 'byte', 'extra_ids': vocabulary.extra_ids}
  from calm_jax import bpe  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, bpe.ByteLevelBPEVocabulary):
    (directory / VOCABULARY_DIR).mkdir(parents=True, exist_ok=True)
    target = directory / VOCABULARY_DIR / f'{stem}vocab.bpe.json'
    target.write_bytes(vocabulary.path.read_bytes())
    return {'type': 'byte_level_bpe', 'file': f'{VOCABULARY_DIR}/{stem}vocab.bpe.json',
            'extra_ids': vocabulary.extra_ids}
  if hasattr(vocabulary, 'reference_kwargs'):
    cls = type(vocabulary)
    return {'type': 'python', 'class': f'{cls.__module__}.{cls.__qualname__}',
            'kwargs': vocabulary.reference_kwargs()}
  raise ValueError(f'Cannot export vocabulary {type(vocabulary).__name__}: give it a '
                   f'reference_kwargs() method or export without one.')


def load_vocabulary(reference: Mapping[str, Any] | None, directory: epath.Path) -> Any:
  """Rebuilds the seqio vocabulary described by `vocabulary_reference`."""
  if reference is None:
    return None
  import seqio  # pylint: disable=g-import-not-at-top
  kind = reference['type']
  if kind == 'sentencepiece':
    return seqio.SentencePieceVocabulary(str(directory / reference['file']),
                                         extra_ids=reference['extra_ids'])
  if kind == 'byte':
    return seqio.ByteVocabulary(extra_ids=reference['extra_ids'])
  if kind == 'byte_level_bpe':
    from calm_jax import bpe  # pylint: disable=g-import-not-at-top
    return bpe.ByteLevelBPEVocabulary(directory / reference['file'],
                                      extra_ids=reference['extra_ids'])
  if kind == 'python':
    module, _, name = reference['class'].rpartition('.')
    return getattr(importlib.import_module(module), name)(**reference['kwargs'])
  raise CheckpointError(f'Unknown vocabulary type {kind!r} in {directory / CONFIG_FILE}.')


def save_composed(path: str | epath.Path, config: CalmConfig, params: Any, *,
                  vocabulary: Any = None, metadata: Mapping[str, Any] | None = None,
                  augment_vocabularies: Mapping[str, Any] | None = None) -> None:
  """Writes a composed checkpoint (module docstring).

  Args:
    path: target directory; must not hold a composed checkpoint already.
    config: the composition.
    params: the whole tree {'anchor', 'augments', 'bridge'} (boxed or not) of numpy or jax
      arrays; sharded arrays are written by every process, each its own shards (all
      processes call this; process 0 writes the config and the vocabulary).
    vocabulary: the seqio vocabulary shared by the models, or None.
    metadata: JSON-serialisable provenance (source run, step, ...).
    augment_vocabularies: {augment: its own vocabulary} for each augment of
      `config.own_tokenizer` (required for them, refused for the others).
  """
  path = epath.Path(path)
  augment_vocabularies = dict(augment_vocabularies or {})
  if set(augment_vocabularies) != set(config.own_tokenizer):
    raise ValueError(f'own-tokenizer augments {list(config.own_tokenizer)} need their '
                     f'vocabularies; got vocabularies of {sorted(augment_vocabularies)}.')
  if augment_vocabularies and vocabulary is None:
    raise ValueError('a composition with an own-tokenizer augment needs the anchor '
                     'vocabulary too (decoding turns its tokens into text).')
  if (path / CONFIG_FILE).exists() or (path / PARAMS_DIR).exists():
    raise CheckpointError(f'{path} already holds a composed checkpoint; choose a new directory.')
  params = nn.unbox(params)
  _check_params(config, params, str(path))
  path.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(checkpoints.orbax_path(path / PARAMS_DIR), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:  # Every process wrote its shards; one writes the rest.
    _write_document(path, config, vocabulary, metadata, augment_vocabularies)
  if jax.process_count() > 1:  # Nobody reads it back before it is complete.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'calm_jax: composed checkpoint {path} written')


def _write_document(path: epath.Path, config: CalmConfig, vocabulary: Any,
                    metadata: Mapping[str, Any] | None,
                    augment_vocabularies: Mapping[str, Any]) -> None:
  """Writes the vocabulary files and, last, `calm.json` with its files' manifest."""
  document = {'format': FORMAT, 'config': config.to_dict(),
              'vocabulary': vocabulary_reference(vocabulary, path),
              'metadata': dict(metadata or {})}
  if augment_vocabularies:
    document['augment_vocabularies'] = {
        name: vocabulary_reference(v, path, stem=f'augment_{name}_')
        for name, v in sorted(augment_vocabularies.items())}
  document['files'] = integrity.manifest(path, parts=[PARAMS_DIR, VOCABULARY_DIR])
  tmp = path / (CONFIG_FILE + '.tmp')
  tmp.write_text(json.dumps(document, indent=2, sort_keys=True))
  tmp.replace(path / CONFIG_FILE)


def _check_params(config: CalmConfig, tree: Any, where: str) -> dict[str, Any]:
  """`checkpoints.check_tree` of a composed tree: it must hold what the composition reads and
  may hold the rest of each augment LM (as exported from a composition run), nothing else.

  Returns:
    {path: abstract leaf} of the parameters in `tree`.
  """
  required = checkpoints.flat_paths(calm_lib.abstract_params(config))
  allowed = dict(required)
  for name, augment in config.augments:
    allowed.update(checkpoints.flat_paths(
        {'augments': {name: transformer_lib.abstract_params(augment)}}))
  return checkpoints.check_tree(tree, required, where, allowed)


def read_document(path: str | epath.Path) -> dict[str, Any]:
  """The parsed `calm.json` of a composed checkpoint, with clear errors."""
  return checkpoints.read_document(path, CONFIG_FILE, FORMAT, 'composed checkpoint')


def is_composed(path: str | epath.Path) -> bool:
  """Whether `path` holds a composed checkpoint."""
  return (epath.Path(path) / CONFIG_FILE).exists()


@dataclasses.dataclass
class Composed:
  """A loaded composed checkpoint.

  Attributes:
    config: the composition.
    params: {'anchor', 'augments', 'bridge'} of jax arrays.
    vocabulary: the seqio vocabulary, or None if none was exported.
    metadata: what the export recorded.
    augment_vocabularies: {augment: its own vocabulary} of the own-tokenizer augments.
  """

  config: CalmConfig
  params: Any
  vocabulary: Any = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  augment_vocabularies: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> calm_lib.Calm:
    """The flax module."""
    return calm_lib.Calm(self.config)

  @functools.cached_property
  def _generate_fns(self) -> dict[tuple[Any, ...], Callable[..., jax.Array]]:
    return {}

  def generate(self, input_tokens: Any, prompt_mask: Any, *, max_decode_len: int,
               eos_id: int | None = None, sampling: decoding.Sampling = decoding.Sampling(),
               num_beams: int = 1, seed: int = 0) -> np.ndarray:
    """Continues prompts in T5X's layout (see calm_jax.decoding) with the cached decoder.

    Args:
      input_tokens: [B, P] decoder input tokens (0 first, then the prompt).
      prompt_mask: [B, P] 1 on each row's prompt region.
      max_decode_len: tokens to generate.
      eos_id: default the vocabulary's EOS (or 1 without one).
      sampling: greedy by default.
      num_beams: > 1 for beam search.
      seed: PRNG seed of sampling.

    Returns:
      [B, max_decode_len] generated token ids.

    Raises:
      ValueError: an augment with its own tokenizer (it reads text: use `generate_text`).
    """
    if self.config.own_tokenizer:
      raise ValueError('an augment with its own tokenizer re-tokenizes the text as it is '
                       'written: decode with generate_text.')
    if eos_id is None:
      eos_id = self.vocabulary.eos_id if self.vocabulary is not None else 1
    key = (max_decode_len, eos_id, sampling, num_beams)
    if key not in self._generate_fns:
      self._generate_fns[key] = decoding.make_generate_fn(
          self.model, max_decode_len=max_decode_len, eos_id=eos_id, sampling=sampling,
          num_beams=num_beams)
    out = self._generate_fns[key](self.params, jnp.asarray(input_tokens, jnp.int32),
                                  jnp.asarray(prompt_mask, jnp.int32), jax.random.key(seed))
    return np.asarray(out)

  def generate_text(self, prompts: str | Sequence[str], *, max_decode_len: int,
                    **kwargs) -> str | list[str]:
    """Encodes prompts with the vocabulary, generates, decodes up to EOS (see `generate`).

    Args:
      prompts: one prompt, or a sequence of them.
      max_decode_len: tokens to generate per prompt.
      **kwargs: the other arguments of `generate`.

    Returns:
      The continuation of a single prompt, or one per prompt (an empty list for none).

    Raises:
      ValueError: no vocabulary was exported, or a prompt holds words (tokens) outside it: the
        model would continue an unknown token, silently. Vocabularies with `unknown_words(text)`
        (calm_tasks' WordVocabulary) name the words; others are checked for their `unk_id`.
      TypeError: a prompt that is not a string.
    """
    if self.vocabulary is None:
      raise ValueError('This composed checkpoint was exported without a vocabulary.')
    if isinstance(prompts, str):
      return self.generate_text([prompts], max_decode_len=max_decode_len, **kwargs)[0]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError(f'generate_text takes a string or a sequence of strings, not {prompts!r}.')
    if not prompts:
      return []
    if self.config.own_tokenizer:
      (name,) = self.config.own_tokenizer
      eos_id = kwargs.pop('eos_id', None)
      if eos_id not in (None, self.vocabulary.eos_id):
        raise ValueError('an augment with its own tokenizer stops at the vocabulary\'s EOS.')
      out = np.concatenate(list(decoding.generate_aligned_texts(
          self.model, self.params, prompts, anchor_vocabulary=self.vocabulary,
          augment_vocabulary=self.augment_vocabularies[name], max_decode_len=max_decode_len,
          batch_size=len(prompts), **kwargs)))
      return [self.vocabulary.decode(_until_eos(row, self.vocabulary)) for row in out]
    encoded = [self.vocabulary.encode(p) for p in prompts]
    if hasattr(self.vocabulary, 'unknown_words'):
      unknown = [(p, self.vocabulary.unknown_words(p)) for p in prompts]
      unknown = [f'{", ".join(words)} (in {p!r})' for p, words in unknown if words]
      if unknown:
        raise ValueError(f'Words outside the vocabulary: {"; ".join(unknown)}.')
    else:
      try:
        unk_id = getattr(self.vocabulary, 'unk_id', None)
      except NotImplementedError:  # seqio.Vocabulary's default.
        unk_id = None
      unknown = [p for p, ids in zip(prompts, encoded) if unk_id is not None and unk_id in ids]
      if unknown:
        raise ValueError(f'Prompts with text outside the vocabulary (encoded as its unknown '
                         f'token, id {unk_id}): {unknown}.')
    input_tokens, prompt_mask = prompt_arrays(encoded)
    out = self.generate(input_tokens, prompt_mask, max_decode_len=max_decode_len, **kwargs)
    return [self.vocabulary.decode(row.tolist()) for row in out]


def prompt_arrays(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """T5X prefix-LM decoder inputs of token-id prompts: ([B, P] tokens, [B, P] prompt mask).

  Each row is 0 followed by its prompt (the shifted-right layout), P = 1 + the longest prompt;
  no prompts give [0, 1] arrays.

  Args:
    prompts: B sequences of token ids.
  """
  width = 1 + max((len(p) for p in prompts), default=0)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, 1:1 + len(prompt)] = prompt
    mask[row, :1 + len(prompt)] = 1
  return tokens, mask


def load_composed(path: str | epath.Path, *, shardings: Any = None,
                  verify: bool = True) -> Composed:
  """Loads a composed checkpoint in one call.

  Args:
    path: the directory written by `save_composed` / `calm-export` (local or `gs://`).
    shardings: a `jax.sharding.Sharding` for every leaf or a matching tree; default: the first
      local device. Or a function of the `CalmConfig` returning the shardings of the
      composition's parameters (the tree of `calm.abstract_params`): then only what the
      composition reads is restored. Parameters are restored straight into their shardings,
      each process reading its own shards.
    verify: check every file's size and SHA-256 first (`calm_jax.integrity`).

  Raises:
    checkpoints.CorruptCheckpointError: a file differs from what was written.
  """
  path = epath.Path(path)
  document = read_document(path)
  config = CalmConfig.from_dict(document['config'])
  params_path = path / PARAMS_DIR
  if not params_path.exists():
    raise CheckpointError(f'{path} has no {PARAMS_DIR}/ directory.')
  checkpoints.check_files(path, document, 'composed checkpoint', verify)
  metadata = checkpoints.stored_tree(params_path)
  stored = _check_params(config, metadata, str(path))
  abstract = jax.tree_util.tree_map_with_path(
      lambda k, _: stored[jax.tree_util.keystr(k)], metadata)
  if callable(shardings):
    shardings = nn.unbox(shardings(config))
    abstract = checkpoints.by_path(shardings, abstract)
  params = checkpoints.restore_tree(params_path, checkpoints.restore_target(abstract, shardings))
  return Composed(config, params, load_vocabulary(document.get('vocabulary'), path),
                  document.get('metadata', {}),
                  {name: load_vocabulary(reference, path)
                   for name, reference in document.get('augment_vocabularies', {}).items()})


def _until_eos(row: np.ndarray, vocabulary: Any) -> list[int]:
  """The ids of `row` before its EOS, without padding (`calm-infer`'s texts)."""
  ids = [int(t) for t in row]
  ids = ids[:ids.index(vocabulary.eos_id)] if vocabulary.eos_id in ids else ids
  return [i for i in ids if i != vocabulary.pad_id]


def _serving_fn(config: CalmConfig, *, max_decode_len: int, eos_id: int,
                sampling: decoding.Sampling, num_beams: int,
                mesh: jax.sharding.Mesh | None = None, rules: Any = None):
  generate = decoding.make_generate_fn(calm_lib.Calm(config), max_decode_len=max_decode_len,
                                       eos_id=eos_id, sampling=sampling, num_beams=num_beams,
                                       mesh=mesh, rules=rules)

  def serve(params, input_tokens, prompt_mask, key_data):
    return generate(params, input_tokens, prompt_mask, jax.random.wrap_key_data(key_data))

  return serve


def export_serving(path: str | epath.Path, composed: Composed, *, prompt_length: int,
                   max_decode_len: int, eos_id: int, sampling: decoding.Sampling = decoding.Sampling(),
                   num_beams: int = 1, platforms: Sequence[str] | None = None,
                   saved_model: bool = False, mesh: jax.sharding.Mesh | None = None,
                   rules: Any = None) -> dict[str, Any]:
  """Writes `path/serving/`: the generate function through `jax.export` (symbolic batch).

  Args:
    path: the composed checkpoint directory.
    composed: its loaded contents.
    prompt_length: P, the width of the prompt arrays the artifact takes.
    max_decode_len, eos_id, sampling, num_beams: fixed in the artifact (see `decoding`).
    platforms: lowering platforms, e.g. ('cpu', 'tpu'); default: this machine's.
    saved_model: also write a TF SavedModel through jax2tf (`serving/saved_model`).
    mesh, rules: export the generate function of this device mesh (`decoding.make_generate_fn`):
      the artifact then runs on as many devices, parameters in their shardings and the batch
      (a multiple of the mesh's batch axes) split over them; None: one device.

  Returns:
    The signature written to `serving/signature.json`.

  Raises:
    ValueError: an augment with its own tokenizer (its decoding tokenizes text on the host,
      which one exported program cannot hold), or a TF SavedModel asked of a mesh.
  """
  if composed.config.own_tokenizer:
    raise ValueError('a composition whose augment has its own tokenizer has no serving '
                     'artifact: its decoding re-tokenizes text on the host (use '
                     'load_composed(...).generate_text).')
  if saved_model and mesh is not None:
    raise ValueError('the TF SavedModel is written for one device: export it without a mesh.')
  serving = epath.Path(path) / SERVING_DIR
  serve = _serving_fn(composed.config, max_decode_len=max_decode_len, eos_id=eos_id,
                      sampling=sampling, num_beams=num_beams, mesh=mesh, rules=rules)
  (batch,) = jax.export.symbolic_shape('b')
  rows = 1
  if mesh is not None:
    rows = partitioning.batch_rows(mesh, rules)
  params_spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=x.sharding if mesh is not None else None),
      composed.params)
  specs = (params_spec, jax.ShapeDtypeStruct((rows * batch, prompt_length), jnp.int32),
           jax.ShapeDtypeStruct((rows * batch, prompt_length), jnp.int32),
           jax.ShapeDtypeStruct((2,), jnp.uint32))
  kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
  exported = jax.export.export(jax.jit(serve), **kwargs)(*specs)
  rows_name = 'b' if rows == 1 else f'{rows}*b'
  signature = {
      'inputs': {'params': f'{CONFIG_FILE} / {PARAMS_DIR}/ tree',
                 'input_tokens': [rows_name, prompt_length, 'int32'],
                 'prompt_mask': [rows_name, prompt_length, 'int32'], 'key_data': [2, 'uint32']},
      'output': [rows_name, max_decode_len, 'int32'], 'max_decode_len': max_decode_len,
      'eos_id': eos_id, 'sampling': dataclasses.asdict(sampling), 'num_beams': num_beams,
      'platforms': list(exported.platforms), 'saved_model': False,
      'devices': exported.nr_devices,
      'mesh': None if mesh is None else dict(mesh.shape),
  }
  if jax.process_index() == 0:
    serving.mkdir(parents=True, exist_ok=True)
    (serving / SERVING_FILE).write_bytes(bytes(exported.serialize()))
    if saved_model:
      _write_saved_model(serving / SAVED_MODEL_DIR, serve, composed.params, prompt_length)
      signature['saved_model'] = True
    (serving / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2))
  return signature


def load_serving(path: str | epath.Path) -> Callable[..., jax.Array]:
  """The exported generate function of a composed checkpoint: `fn(params, tokens, mask, key)`.

  `key` is uint32[2] key data (`jax.random.key_data(jax.random.key(seed))`).
  """
  file = epath.Path(path) / SERVING_DIR / SERVING_FILE
  if not file.exists():
    raise CheckpointError(f'{file} does not exist: export with a serving artifact first.')
  return jax.export.deserialize(bytearray(file.read_bytes())).call


def _write_saved_model(directory: epath.Path, serve, params: Any, prompt_length: int) -> None:
  """A TF SavedModel with a `generate(input_tokens, prompt_mask, key_data)` signature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  leaves, treedef = jax.tree.flatten(params)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  converted = jax2tf.convert(
      lambda flat, tokens, mask, key: serve(jax.tree.unflatten(treedef, flat), tokens, mask, key),
      polymorphic_shapes=[None, '(b, _)', '(b, _)', None], with_gradient=False)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, prompt_length], tf.int32, name='input_tokens'),
      tf.TensorSpec([None, prompt_length], tf.int32, name='prompt_mask'),
      tf.TensorSpec([2], tf.uint32, name='key_data')])
  def generate(input_tokens, prompt_mask, key_data):
    return {'tokens': converted(module.params, input_tokens, prompt_mask, key_data)}

  module.generate = generate
  tf.saved_model.save(module, str(directory), signatures={'serving_default': generate})
