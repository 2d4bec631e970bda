"""Training runs in T5X's layout (`calm-train`): pretrain an LM, compose, or fine-tune.

Modes:
  pretrain   train one LM from scratch (`model_config`); writes `MODEL_DIR/lm`, an LM checkpoint.
  compose    load the anchor and augment LM checkpoints, train the bridges only.
  finetune   load the anchor LM checkpoint, train the parameters matching `trainable_patterns`.
  lora       load the anchor LM checkpoint, add LoRA adapters (`lora`, `calm_jax.lora`) and
             train them only; `MODEL_DIR/lm` is the anchor with the adapters folded in.

A run writes `MODEL_DIR/config.gin` (the resolved configuration), TensorBoard summaries under
`MODEL_DIR/train`, checkpoints under `MODEL_DIR/checkpoints` (state + data position), and a
console line per `log_every` steps with step, loss, tokens/s and ETA. It resumes from the
newest intact checkpoint in `MODEL_DIR` (corrupt ones are moved to `MODEL_DIR/corrupt/` with
a warning); a resumed run ends bit-identical to an uninterrupted one.

Nothing silent: `MODEL_DIR/run_definition.json` records what defines the run (models and
their checkpoints' fingerprints, bridges, task, feature lengths, batch, optimizer) and a
resume with another definition stops, naming the differences (`allow_definition_change`
overrides). Every step's loss, gradient, parameters and optimizer state are checked for
non-finite values on device; the flags are read at each log step and before every save, so
a NaN state is never written and the run stops with `TrainingDivergedError`, keeping the last
good checkpoint.
`train` is a plain function (a notebook calls it directly); `calm_jax.cli.train` configures it
with gin:

  calm-train --gin_file=runs/compose.gin --gin.MODEL_DIR="'/tmp/compose'" \
      --gin.ANCHOR_CHECKPOINT="'/tmp/m_b/lm'" --gin.AUGMENT_CHECKPOINT="'/tmp/m_a/lm'"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
from clu import metric_writers
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from calm_jax import alignment
from calm_jax import calm as calm_lib
from calm_jax import checkpoints, data, lora as lora_lib, optim, partitioning, runs, train_eval
from calm_jax import trainable
from calm_jax import validation
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.train_step import (TrainState, init_train_state, make_sharded_train_step,
                                 state_shardings)
from calm_jax.transformer import Transformer, check_remat
from calm_jax.transformer import abstract_params as lm_abstract_params

MODES = ('pretrain', 'compose', 'finetune', 'lora')
LM_MODES = ('pretrain', 'finetune', 'lora')  # Those that export MODEL_DIR/lm.
CONFIG_FILE = 'config.gin'
DEFINITION_FILE = 'run_definition.json'


class TrainingDivergedError(FloatingPointError):
  """The loss or the trained state became non-finite, or the parameters diverged."""


class RunDefinitionError(ValueError):
  """MODEL_DIR holds another run: resuming it with this configuration would mix two runs."""


@dataclasses.dataclass
class Setup:
  """What a mode builds: the model, its trained and frozen trees, and what to export."""

  model: nn.Module
  trained: Any
  frozen: Any
  lm_config: TransformerConfig | None = None  # pretrain / finetune / lora: the LM to export.
  lora: lora_lib.LoRAConfig | None = None  # lora: the adapters folded in at export.


def build_setup(mode: str, *, seed: int, model_config: TransformerConfig | None,
                anchor_checkpoint: str | None, augment_checkpoints: Mapping[str, str] | None,
                bridges: Mapping[str, BridgeConfig], augment_as_encoder: bool,
                trainable_patterns: Sequence[str] | None, anchor_config: TransformerConfig | None,
                augment_configs: Mapping[str, TransformerConfig] | None,
                mesh: jax.sharding.Mesh | None = None,
                rules: partitioning.Rules = partitioning.STANDARD_RULES,
                remat: str = 'none', lora: lora_lib.LoRAConfig | None = None,
                own_tokenizer: Sequence[str] = (),
                attention_block_size: int | None = None) -> Setup:
  """Builds the model and parameter trees of `mode` (see the module docstring).

  Every parameter is created or restored directly in its sharding on `mesh` (default: a mesh
  of all devices): nothing is materialised whole on one host first. A frozen checkpoint whose
  architecture differs from `anchor_config` / `augment_configs[name]` (when given) is an error.
  `remat` is the model's rematerialisation ('none', 'full', 'dots'): a composition's anchor
  layers above the first bridge, or every layer of a pretrained / fine-tuned LM. `lora`: the
  adapters of 'lora' mode (A random, B zero: the model starts as exactly the anchor).
  `own_tokenizer`: compose: the augments that read the text in their own tokenization.
  `attention_block_size`: the models attend in blocks of that many keys (None: materialised
  masks; see `Transformer`).
  """
  block = attention_block_size
  mesh = mesh or partitioning.make_mesh()

  def lm_shardings(cfg):
    return partitioning.param_shardings(lm_abstract_params(cfg), mesh, rules)

  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; choose from {MODES}.')
  if mode == 'pretrain':
    if model_config is None:
      raise ValueError('pretrain needs a model_config (e.g. MODEL_CONFIG from gin/models/).')
    model = Transformer(model_config, remat=remat, attention_block_size=block)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(model.init(key, tokens)['params']),
                   out_shardings=lm_shardings(model_config))
    return Setup(model, init(jax.random.key(seed)), {}, model_config)
  if anchor_checkpoint is None:
    raise ValueError(f'{mode} needs ANCHOR_CHECKPOINT.')
  anchor_cfg, anchor = checkpoints.load_lm(anchor_checkpoint, config=anchor_config,
                                           shardings=lm_shardings)
  if mode == 'finetune':
    patterns = tuple(trainable_patterns or (r'.*',))
    trained, frozen = trainable.split_params(anchor, patterns)
    return Setup(Transformer(anchor_cfg, remat=remat, attention_block_size=block), trained,
                 frozen, anchor_cfg)
  if mode == 'lora':
    if lora is None:
      raise ValueError('lora mode needs a LoRAConfig (gin: train.lora = @lora.LoRAConfig()).')
    abstract = lm_abstract_params(anchor_cfg, lora)
    shardings = partitioning.param_shardings(abstract, mesh, rules)
    adapter_shardings, _ = trainable.split_params(shardings, lora_lib.ADAPTER_PATTERNS)
    trained = jax.jit(lambda key: lora_lib.init_adapters(abstract, key),
                      out_shardings=adapter_shardings)(jax.random.key(seed))
    return Setup(Transformer(anchor_cfg, remat=remat, lora=lora, attention_block_size=block),
                 trained, anchor, anchor_cfg, lora)
  if not augment_checkpoints:
    raise ValueError('compose needs AUGMENT_CHECKPOINT (or augment_checkpoints).')
  augments = {name: checkpoints.load_lm_config(path, (augment_configs or {}).get(name))
              for name, path in augment_checkpoints.items()}
  config = CalmConfig(anchor=anchor_cfg, augments=augments, bridges=dict(bridges),
                      augment_as_encoder=augment_as_encoder, own_tokenizer=tuple(own_tokenizer))
  abstract = calm_lib.abstract_params(config)
  shardings = partitioning.param_shardings(abstract, mesh, rules)
  # Only what the composition reads: an augment's head and its layers above the deepest
  # connection are never restored.
  augment_params = {name: checkpoints.load_lm(
      path, config=augments[name], select=nn.unbox(abstract)['augments'][name],
      shardings=shardings['augments'][name])[1]
                    for name, path in augment_checkpoints.items()}
  bridge_shardings = shardings['bridge']
  trained = jax.jit(lambda key: calm_lib.init_bridge_params(config, key),
                    out_shardings={'bridge': bridge_shardings})(jax.random.key(seed))
  return Setup(calm_lib.Calm(config, remat=remat, attention_block_size=block), trained,
               {'anchor': anchor, 'augments': augment_params})


def run_definition(setup: Setup, optimizer: Any, *, mode: str,
                   anchor_checkpoint: str | None, augment_checkpoints: Mapping[str, str] | None,
                   trainable_patterns: Sequence[str] | None, mixture_or_task_name: str,
                   task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool,
                   split: str, seed: int, z_loss: float) -> dict[str, Any]:
  """What defines a run: resuming it with anything else would train another model.

  Frozen checkpoints count by their fingerprint (`checkpoints.lm_fingerprint`), not their
  path, so a copied checkpoint still matches; the optimizer by its state's structure.
  The learning rate and TRAIN_STEPS may change on resume.
  """
  opt_state = jax.eval_shape(optimizer.init, setup.trained)
  definition: dict[str, Any] = {
      'mode': mode, 'mixture_or_task_name': mixture_or_task_name,
      'task_feature_lengths': {k: int(v) for k, v in sorted(dict(task_feature_lengths).items())},
      'batch_size': int(batch_size), 'pack': bool(pack), 'split': split, 'seed': int(seed),
      'z_loss': float(z_loss),
      'optimizer_state': hashlib.sha256(
          str(jax.tree.structure(opt_state)).encode()).hexdigest()[:16],
  }
  if mode == 'pretrain':
    definition['model'] = setup.lm_config.to_dict()
  else:
    definition['anchor'] = checkpoints.lm_fingerprint(anchor_checkpoint)
  if mode == 'finetune':
    definition['trainable_patterns'] = list(trainable_patterns or (r'.*',))
  if mode == 'lora':
    definition['lora'] = dataclasses.asdict(setup.lora)
  if mode == 'compose':
    config = setup.model.config
    definition['augments'] = {name: checkpoints.lm_fingerprint(path)
                              for name, path in sorted(augment_checkpoints.items())}
    definition['bridges'] = {name: b.to_dict() for name, b in config.bridges}
    definition['augment_as_encoder'] = config.augment_as_encoder
    if config.own_tokenizer:  # Absent otherwise: runs from before it resume unchanged.
      definition['own_tokenizer'] = list(config.own_tokenizer)
  return json.loads(json.dumps(definition))  # As it reads back from the file (tuples: lists).


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
  return out


def definition_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'key: recorded X, now Y' for each entry of two run definitions that differs."""
  old, new = _flatten(dict(stored)), _flatten(dict(current))
  return [f'{key}: recorded {old.get(key, "(absent)")!r}, now {new.get(key, "(absent)")!r}'
          for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _check_definition(model_dir: epath.Path, definition: Mapping[str, Any],
                      checkpoint_paths: Mapping[str, Any], allow_change: bool,
                      warn: Callable[[str], None]) -> None:
  """Stops a resume whose definition differs from MODEL_DIR's record (see `run_definition`)."""
  file = model_dir / DEFINITION_FILE
  if not file.exists():
    warn(f'{model_dir} has checkpoints but no {DEFINITION_FILE} (an older run): resuming '
         f'without checking that it is the same run.')
    return
  recorded = json.loads(file.read_text())
  found = definition_differences(recorded['definition'], definition)
  if not found:
    return
  paths = f' Recorded checkpoints: {recorded.get("checkpoints")}; now: {dict(checkpoint_paths)}.'
  if allow_change:
    warn(f'Resuming {model_dir} with a changed definition (allow_definition_change): '
         f'{"; ".join(found)}.')
    return
  raise RunDefinitionError(
      f'{model_dir} holds another run; resuming it would mix two runs. Differences: '
      f'{"; ".join(found)}.{paths} Use a new MODEL_DIR, or set '
      f'train_lib.train.allow_definition_change = True to resume anyway.')


def _write_definition(model_dir: epath.Path, definition: Mapping[str, Any],
                      checkpoint_paths: Mapping[str, Any]) -> None:
  document = {'definition': dict(definition), 'checkpoints': dict(checkpoint_paths)}
  (model_dir / DEFINITION_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))


def _periodic_eval(model_dir: epath.Path, setup: Setup, train_state_shardings: TrainState,
                   mesh: jax.sharding.Mesh, rules: partitioning.Rules, *,
                   train_eval_name: str | None, infer_eval_name: str | None, eval_period: int,
                   eval_steps: int, batch_size: int, infer_examples: int | None, split: str,
                   task_feature_lengths: Mapping[str, int], is_chief: bool,
                   log: Callable[[str], None]) -> train_eval.PeriodicEval | None:
  """The evaluations during training that the run asks for, or None."""
  if not (train_eval_name or infer_eval_name):
    return None
  if eval_period <= 0:
    raise validation.ConfigError(f'eval_period must be positive, got {eval_period}.')
  trainer = inferer = None
  if train_eval_name:
    validation.check_feature_lengths(train_eval_name, task_feature_lengths)
    validation.check_batch_size(batch_size, mesh, rules)
    trainer = train_eval.TrainEvaluator(
        setup.model, train_eval_name, task_feature_lengths, batch_size, eval_steps, split,
        mesh, rules, train_state_shardings.params,
        jax.tree.map(lambda x: x.sharding, setup.frozen))
  if infer_eval_name:
    validation.check_feature_lengths(infer_eval_name, task_feature_lengths)
    inferer = train_eval.InferEvaluator(
        setup.model, infer_eval_name, task_feature_lengths, batch_size, split, infer_examples,
        model_dir / 'eval' / 'inference')
  writer = (metric_writers.SummaryWriter(str(model_dir / 'eval')) if is_chief
            else metric_writers.MultiWriter([]))
  return train_eval.PeriodicEval(model_dir, trainer, inferer, eval_period, writer, log)


def _vocab_sizes(mode: str, model_config: TransformerConfig | None,
                 anchor_checkpoint: str | None, anchor_config: TransformerConfig | None,
                 augment_checkpoints: Mapping[str, str] | None,
                 augment_configs: Mapping[str, TransformerConfig] | None,
                 own_tokenizer: Sequence[str] = ()) -> dict[str, Any]:
  """`validation.validate_run`'s vocabulary arguments, from configs alone (no weights read)."""
  if mode == 'pretrain':
    return {'model_vocab_size': model_config.vocab_size if model_config else None}
  if not anchor_checkpoint:
    return {'model_vocab_size': None}
  sizes: dict[str, Any] = {'model_vocab_size': (
      anchor_config or checkpoints.load_lm_config(anchor_checkpoint)).vocab_size}
  if mode == 'compose':
    sizes['augment_vocab_sizes'] = {
        name: ((augment_configs or {}).get(name) or checkpoints.load_lm_config(path)).vocab_size
        for name, path in (augment_checkpoints or {}).items()}
    sizes['own_tokenizer'] = tuple(own_tokenizer)
  return sizes


def _call_record(arguments: Mapping[str, Any]) -> str:
  """`config.gin` of a run started from Python: its arguments, one per line."""
  lines = ['# calm_jax.train.train, called from Python with:']
  lines += [f'# {name} = {value!r}' for name, value in arguments.items()]
  return '\n'.join(lines) + '\n'


def _progress(step: int, total: int, metrics: Mapping[str, float], elapsed: float,
              first: int) -> str:
  done = step - first
  eta = elapsed / done * (total - step) if done else float('nan')
  return (f'step {step}/{total}  loss {metrics["loss"]:.4f}  acc {metrics["accuracy"]:.3f}  '
          f'lr {metrics["learning_rate"]:.2e}  {metrics["tokens_per_s"]:,.0f} tokens/s  '
          f'ETA {eta:,.0f}s')


def _initial_state(setup: Setup, optimizer: Any, mesh: jax.sharding.Mesh,
                   checkpointer: checkpoints.RunCheckpointer, log: Callable[[str], None],
                   warn: Callable[[str], None]) -> tuple[TrainState, TrainState, int]:
  """(state, its shardings, batches consumed): step 0 in its sharding, or the newest intact
  checkpoint (`RunCheckpointer.restore_latest`)."""
  trained_shardings = jax.tree.map(lambda x: x.sharding, setup.trained)
  shardings = state_shardings(optimizer, setup.trained, trained_shardings, mesh)
  state = jax.jit(lambda p: init_train_state(p, optimizer),
                  out_shardings=shardings)(setup.trained)
  consumed = 0
  restored = checkpointer.restore_latest(state, warn=warn)
  if restored is not None:
    state, consumed, step = restored
    log(f'resumed from step {step} ({consumed} batches consumed)')
  return state, shardings, consumed


def _scalar(x: jax.Array) -> float:
  """A replicated metric as a Python float (this process's copy: no cross-host transfer)."""
  return float(np.asarray(x.addressable_data(0)))


def _check_health(pending: list[tuple[int, dict[str, jax.Array]]], max_param_abs: float | None,
                  checkpointer: checkpoints.RunCheckpointer) -> None:
  """Raises TrainingDivergedError at the first step of `pending` whose state is not healthy.

  `pending` holds (step, metrics) of the steps since the last check; their flags were
  computed on device and come to the host here in one transfer.
  """
  flags = jax.device_get([(m['finite'].addressable_data(0),
                           m['param_max_abs'].addressable_data(0)) for _, m in pending])
  for (step, metrics), (finite, largest) in zip(pending, flags):
    if finite and (max_param_abs is None or largest <= max_param_abs):
      continue
    what = (f'non-finite loss, gradient or state (loss {_scalar(metrics["loss"])})' if not finite
            else f'parameters diverged (max |parameter| {largest:.3g} > max_param_abs '
                 f'{max_param_abs:.3g})')
    latest = checkpointer.latest_step()
    kept = (f'the last good checkpoint, step {latest}, is kept' if latest is not None
            else 'no checkpoint had been saved')
    raise TrainingDivergedError(
        f'Training stopped at step {step}: {what}. Nothing from step {step} on was saved; '
        f'{kept}. Lower the learning rate or check the data.')


def _train_loop(step_fn: Callable[..., Any], state: TrainState, frozen: Any,
                batches: Iterator[dict[str, np.ndarray]], *, first: int, train_steps: int,
                consumed: int, schedule: Callable[[int], Any], mesh: jax.sharding.Mesh,
                rules: partitioning.Rules, writer: Any,
                checkpointer: checkpoints.RunCheckpointer, log_every: int, save_every: int,
                max_param_abs: float | None, periodic_eval: train_eval.PeriodicEval | None,
                log: Callable[[str], None]) -> tuple[TrainState, dict[str, float]]:
  """Steps `first` -> `train_steps`: progress lines and summaries, checkpoints, evaluations,
  NaN guard.

  The health flags of every step are read at each log step, before every evaluation and
  before every save, so no unhealthy state is evaluated or reaches a checkpoint.
  """
  last: dict[str, float] = {}
  run_start = window_start = time.perf_counter()
  window_tokens = 0
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  for step in range(first, train_steps):
    batch = next(batches)  # This process's rows.
    state, metrics = step_fn(state, frozen, partitioning.global_batch(batch, mesh, rules))
    done = step + 1
    pending.append((done, metrics))
    checkpointer.poll()
    is_log = done % log_every == 0 or done == train_steps
    is_save = done % save_every == 0 or done == train_steps
    is_eval = periodic_eval is not None and (periodic_eval.due(done) or done == train_steps)
    if is_log or is_save or is_eval:
      _check_health(pending, max_param_abs, checkpointer)
      pending = []
    if is_eval:
      periodic_eval(done, state.params, frozen)
    if step == first:  # Throughput and ETA leave out the first step's compilation.
      jax.block_until_ready(state)
      run_start = window_start = time.perf_counter()
      log(f'compiled and ran step {done}')
    else:
      window_tokens += int(np.sum(batch['decoder_target_tokens'] != 0)) * jax.process_count()
    if is_log:
      last = {k: _scalar(v) for k, v in metrics.items()}
      now = time.perf_counter()
      last['learning_rate'] = float(schedule(step))
      last['tokens_per_s'] = window_tokens / max(now - window_start, 1e-9)
      writer.write_scalars(done, last)
      log(_progress(done, train_steps, last, now - run_start, first + 1))
      window_start, window_tokens = now, 0
    if is_save:
      checkpointer.save(done, state, consumed + done - first)
  return state, last


def _export_lm(model_dir: epath.Path, setup: Setup, state: TrainState, mode: str,
               train_steps: int, log: Callable[[str], None]) -> None:
  """Writes `MODEL_DIR/lm` of a pretrain / finetune / lora run (LoRA adapters folded into
  the kernels; every process writes its shards)."""
  lm_dir = model_dir / 'lm'
  params = trainable.merge_params(state.params, setup.frozen)
  if setup.lora is not None:
    params = lora_lib.merge_adapters(params, setup.lora)
  if jax.process_index() == 0 and lm_dir.exists():
    lm_dir.rmtree()
  multihost_utils.sync_global_devices('calm_jax.train: lm dir cleared')
  checkpoints.save_lm(lm_dir, setup.lm_config, params,
                      metadata={'source': f'calm-train {mode}', 'steps': train_steps})
  log(f'wrote LM checkpoint {lm_dir}')


def train(*, model_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
          train_steps: int, batch_size: int, mode: str = 'compose',
          model_config: TransformerConfig | None = None, anchor_checkpoint: str | None = None,
          augment_checkpoints: Mapping[str, str] | None = None,
          bridges: Mapping[str, BridgeConfig | None] | None = None,
          augment_as_encoder: bool = False, trainable_patterns: Sequence[str] | None = None,
          lora: lora_lib.LoRAConfig | None = None,
          anchor_config: TransformerConfig | None = None,
          augment_configs: Mapping[str, TransformerConfig] | None = None,
          augment_vocabularies: Mapping[str, Any] | None = None,
          optimizer_fn: Callable[..., Any] = optim.make_optimizer, z_loss: float = 0.0,
          seed: int = 0, pack: bool = False, split: str = 'train', log_every: int = 50,
          save_every: int = 500, keep_checkpoints: int = 3,
          mesh: partitioning.MeshConfig | None = None, remat: str = 'none',
          attention_block_size: int | None = None, loss_chunk_size: int | None = None,
          max_param_abs: float | None = 1e10,
          allow_definition_change: bool = False,
          train_eval_mixture_or_task_name: str | None = None,
          infer_eval_mixture_or_task_name: str | None = None, eval_period: int | None = None,
          eval_steps: int = 20, eval_batch_size: int | None = None,
          infer_eval_examples: int | None = None, run_eval_before_training: bool = False,
          eval_split: str = 'validation',
          config_text: str | None = None, log: Callable[[str], None] = logging.info,
          warn: Callable[[str], None] = logging.warning) -> dict[str, float]:
  """Trains per `mode` and returns the last logged metrics.

  Args:
    model_dir: the run's directory (MODEL_DIR), local or gs://.
    mixture_or_task_name: SeqIO task or mixture (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: e.g. {'inputs': 16, 'targets': 8} (TASK_FEATURE_LENGTHS).
    train_steps: total steps (TRAIN_STEPS); a resumed run continues up to it.
    batch_size: global batch (BATCH_SIZE).
    mode: 'pretrain', 'compose', 'finetune' or 'lora'.
    model_config: pretrain: the LM to train (MODEL_CONFIG).
    anchor_checkpoint: compose / finetune / lora: the anchor LM checkpoint
      (ANCHOR_CHECKPOINT).
    augment_checkpoints: compose: {augment name: LM checkpoint} (gin: {'augment':
      %AUGMENT_CHECKPOINT}).
    bridges: compose: {augment name: BridgeConfig}; an augment without one, or with None,
      gets the default `BridgeConfig()`.
    augment_as_encoder: compose: the encoder ablation.
    trainable_patterns: finetune: regular expressions of trained parameter paths (default all).
    lora: lora: the adapters (`calm_jax.lora.LoRAConfig`; gin/runs/lora.gin).
    anchor_config: if set, the anchor checkpoint must have exactly this architecture.
    augment_configs: {augment name: the architecture its checkpoint must have}.
    augment_vocabularies: compose: {augment name: its own vocabulary} for an augment that
      reads the text in its own tokenization (a seqio vocabulary, a SentencePiece `.model`,
      a `vocab.bpe.json` or an LM checkpoint that carries one; None entries are dropped). The
      task must yield that augment's stream in this vocabulary
      (`calm_tasks.memory_tasks.aligned_seq2seq_task`); the run keeps a copy
      (MODEL_DIR/vocabularies/), which evaluation, inference and export read.
    optimizer_fn: `(total_steps=...) -> (optax transformation, schedule)`; configure
      `optim.make_optimizer` in gin.
    z_loss: z-loss coefficient.
    seed: initialisation and data seed.
    pack: pack examples.
    split: dataset split.
    log_every: steps between console lines and summaries.
    save_every: steps between checkpoints (the last step is always saved).
    keep_checkpoints: checkpoints kept.
    mesh: the device mesh and rule set (MESH, gin/meshes/); default: data parallel over all
      devices, parameters replicated.
    remat: 'none', 'full' (recompute) or 'dots' (keep the weight matmuls): rematerialise the
      layers that are differentiated (compose: the anchor layers above the first bridge) to
      trade about one extra forward of them for their activation memory.
    attention_block_size: attend in blocks of this many keys (flash-style; the same
      result, activation memory linear in length), or None: over materialised masks.
    loss_chunk_size: compute the loss's logits this many positions at a time and recompute
      them in the backward pass (`losses.chunked_cross_entropy_loss`: the same loss, without
      the [B, T, V] logits; what a 256K vocabulary needs at long lengths), or None.
    max_param_abs: the run stops (TrainingDivergedError) when a trained parameter's
      magnitude exceeds this (a diverged run with a finite loss); None: never.
    allow_definition_change: resume MODEL_DIR even if the run's definition (models,
      bridges, task, feature lengths, batch, optimizer) differs from its record.
    train_eval_mixture_or_task_name: evaluate this task or mixture teacher-forced (loss and
      token accuracy per task) during training (`calm_jax.train_eval`).
    infer_eval_mixture_or_task_name: decode this task or mixture and score it with its seqio
      metrics during training (one process only).
    eval_period: steps between evaluations (default `save_every`); the last step is always
      evaluated.
    eval_steps: train_eval batches per task.
    eval_batch_size: batch of both evaluations (default `batch_size`).
    infer_eval_examples: infer_eval examples per task (default: the whole split).
    run_eval_before_training: also evaluate before the first step (at the resumed step).
    eval_split: the split both evaluations read.
    config_text: the resolved configuration written to MODEL_DIR/config.gin (the command line
      passes gin's); default: a record of this call's arguments.
    log: console sink (process 0 only).
    warn: sink for warnings (process 0 only): corrupt checkpoints set aside, changed runs.

  Raises:
    TrainingDivergedError: non-finite or diverged training (nothing unhealthy is saved).
    RunDefinitionError: MODEL_DIR holds another run.
    checkpoints.CorruptCheckpointError: MODEL_DIR has checkpoints, none of them intact.
  """
  if config_text is None:
    config_text = _call_record({k: v for k, v in locals().items() if k != 'config_text'})
  check_remat(remat)
  if attention_block_size is not None and (not isinstance(attention_block_size, int)
                                           or attention_block_size <= 0):
    raise validation.ConfigError(
        f'ATTENTION_BLOCK_SIZE must be a positive int or None, got {attention_block_size!r}.')
  if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int)
                                      or loss_chunk_size <= 0):
    raise validation.ConfigError(
        f'LOSS_CHUNK_SIZE must be a positive int or None, got {loss_chunk_size!r}.')
  model_dir = epath.Path(model_dir)
  is_chief = jax.process_index() == 0
  if not is_chief:
    log = warn = lambda _: None  # pylint: disable=unnecessary-lambda-assignment
  mesh_config = mesh or partitioning.MeshConfig()
  device_mesh = partitioning.make_mesh(mesh_config)
  rules = mesh_config.rules()
  vocabularies = {name: alignment.resolve_vocabulary(v)
                  for name, v in (augment_vocabularies or {}).items() if v is not None}
  if mode == 'compose':
    unknown = sorted(set(vocabularies) - set(augment_checkpoints or {}))
    if unknown:
      raise validation.ConfigError(
          f'augment_vocabularies names {unknown}, not augments of this run '
          f'({sorted(augment_checkpoints or {})}).')
    try:
      alignment.check_task_vocabularies(mixture_or_task_name, vocabularies)
    except (ValueError, KeyError) as e:
      if isinstance(e, data.UnknownTaskError):
        raise
      raise validation.ConfigError(str(e)) from e
  elif vocabularies:
    raise validation.ConfigError(f'augment_vocabularies is for compose runs, not {mode}.')
  log(f'mesh {dict(device_mesh.shape)} over {jax.device_count()} devices, '
      f'{jax.process_count()} process(es); {"FSDP" if mesh_config.fsdp else "standard"} rules')
  validation.validate_run(
      mode=mode, mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=task_feature_lengths, batch_size=batch_size, split=split,
      mesh=device_mesh, rules=rules, log=warn, **_vocab_sizes(
          mode, model_config, anchor_checkpoint, anchor_config, augment_checkpoints,
          augment_configs, tuple(vocabularies)))
  if is_chief:
    model_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = checkpoints.RunCheckpointer(model_dir, keep_checkpoints)
  setup = build_setup(
      mode, seed=seed, model_config=model_config, anchor_checkpoint=anchor_checkpoint,
      augment_checkpoints=augment_checkpoints,
      bridges={k: v for k, v in (bridges or {}).items() if v is not None},
      augment_as_encoder=augment_as_encoder, trainable_patterns=trainable_patterns,
      anchor_config=anchor_config, augment_configs=augment_configs, mesh=device_mesh,
      rules=rules, remat=remat, lora=lora, own_tokenizer=tuple(vocabularies),
      attention_block_size=attention_block_size)
  optimizer, schedule = optimizer_fn(total_steps=train_steps)
  definition = run_definition(
      setup, optimizer, mode=mode, anchor_checkpoint=anchor_checkpoint,
      augment_checkpoints=augment_checkpoints, trainable_patterns=trainable_patterns,
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      batch_size=batch_size, pack=pack, split=split, seed=seed, z_loss=z_loss)
  checkpoint_paths = {'anchor': anchor_checkpoint, 'augments': dict(augment_checkpoints or {})}
  if checkpointer.latest_step() is not None:  # Resuming: it must be the same run.
    _check_definition(model_dir, definition, checkpoint_paths, allow_definition_change, warn)
  if is_chief:  # Written only once the run is known to be this one.
    (model_dir / CONFIG_FILE).write_text(config_text)
    _write_definition(model_dir, definition, checkpoint_paths)
    if mode == 'compose':
      runs.write_calm_run(model_dir, setup.model.config, anchor_checkpoint, augment_checkpoints,
                          augment_vocabularies=vocabularies)
  state, train_state_shardings, consumed = _initial_state(setup, optimizer, device_mesh,
                                                          checkpointer, log, warn)
  first = int(np.asarray(state.step.addressable_data(0)))
  log(f'{mode}: {trainable.count_params(state.params):,} trained and '
      f'{trainable.count_params(setup.frozen):,} frozen parameters; '
      f'steps {first} -> {train_steps}')
  if first >= train_steps:
    log(f'nothing to train: the checkpoint is at step {first} and TRAIN_STEPS is '
        f'{train_steps} (raise TRAIN_STEPS to train on)')
  dataset = data.get_dataset(mixture_or_task_name, task_feature_lengths, split, batch_size,
                             seed=seed, pack=pack, skip_batches=consumed)
  step_fn = make_sharded_train_step(
      setup.model, optimizer, z_loss, mesh=device_mesh, rules=rules,
      train_state_shardings=train_state_shardings,
      frozen_shardings=jax.tree.map(lambda x: x.sharding, setup.frozen),
      loss_chunk_size=loss_chunk_size)
  writer = (metric_writers.SummaryWriter(str(model_dir / 'train')) if is_chief
            else metric_writers.MultiWriter([]))
  periodic_eval = _periodic_eval(
      model_dir, setup, train_state_shardings, device_mesh, rules,
      train_eval_name=train_eval_mixture_or_task_name,
      infer_eval_name=infer_eval_mixture_or_task_name,
      eval_period=save_every if eval_period is None else eval_period,
      eval_steps=eval_steps, batch_size=eval_batch_size or batch_size,
      infer_examples=infer_eval_examples, split=eval_split,
      task_feature_lengths=task_feature_lengths, is_chief=is_chief, log=log)
  if periodic_eval is not None and run_eval_before_training and first < train_steps:
    periodic_eval(first, state.params, setup.frozen)
  try:
    state, last = _train_loop(
        step_fn, state, setup.frozen, data.as_numpy_batches(dataset), first=first,
        train_steps=train_steps, consumed=consumed, schedule=schedule, mesh=device_mesh,
        rules=rules, writer=writer, checkpointer=checkpointer, log_every=log_every,
        save_every=save_every, max_param_abs=max_param_abs, periodic_eval=periodic_eval,
        log=log)
  finally:  # Seals the saves already made (each was checked healthy before it started).
    checkpointer.close()
    writer.flush()
  exported = (model_dir / 'lm' / checkpoints.CONFIG_FILE).exists()
  if mode in LM_MODES and (first < train_steps or not exported):
    _export_lm(model_dir, setup, state, mode, train_steps, log)
  return last
