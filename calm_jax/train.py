"""`calm-train`: T5X-style training runs, configured by gin.

Modes:
  pretrain   train one LM from scratch (`model_config`); writes `MODEL_DIR/lm`, an LM checkpoint.
  compose    load the anchor and augment LM checkpoints, train the bridges only.
  finetune   load the anchor LM checkpoint, train the parameters matching `trainable`.

A run writes `MODEL_DIR/config.gin` (the resolved configuration), TensorBoard summaries under
`MODEL_DIR/train`, checkpoints under `MODEL_DIR/checkpoints` (state + data position), and a
console line per `log_every` steps with step, loss, tokens/s and ETA. It resumes from the
latest checkpoint in `MODEL_DIR`; a resumed run ends bit-identical to an uninterrupted one.

  calm-train --gin_file=runs/compose.gin --gin.MODEL_DIR="'/tmp/compose'" \
      --gin.ANCHOR_CHECKPOINT="'/tmp/m_b/lm'" --gin.AUGMENT_CHECKPOINT="'/tmp/m_a/lm'"
"""

from __future__ import annotations

if __name__ == '__main__':
  # `python -m calm_jax.train`: run the importable module, so that gin registers its configurable
  # once, under the name the gin files use (not also as `__main__.*`).
  from calm_jax.train import main as _main  # pylint: disable=g-import-not-at-top
  _main()
  raise SystemExit(0)

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from clu import metric_writers
from etils import epath
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from calm_jax import calm as calm_lib
from calm_jax import checkpoints, data, gin_cli, optim, partitioning, trainable
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.train_step import TrainState, apply_fn_for, init_train_state, make_train_step
from calm_jax.transformer import Transformer, check_remat
from calm_jax.transformer import abstract_params as lm_abstract_params

MODES = ('pretrain', 'compose', 'finetune')
DEFAULT_AUGMENT = 'augment'


@dataclasses.dataclass
class Setup:
  """What a mode builds: the model, its trained and frozen trees, and what to export."""

  model: nn.Module
  trained: Any
  frozen: Any
  lm_config: TransformerConfig | None = None  # pretrain / finetune: the LM to export.


def _check_expected(path: str, expected: TransformerConfig | None) -> TransformerConfig:
  config = checkpoints.load_lm_config(path)
  if expected is not None and config != expected:
    raise checkpoints.CheckpointError(
        f'LM checkpoint {path} does not match the run\'s gin: (checkpoint, gin) = '
        f'{config.differences(expected)}.')
  return config


def build_setup(mode: str, *, seed: int, model_config: TransformerConfig | None,
                anchor_checkpoint: str | None, augment_checkpoints: Mapping[str, str] | None,
                bridges: Mapping[str, BridgeConfig] | None, augment_as_encoder: bool,
                trainable_patterns: Sequence[str] | None, anchor_config: TransformerConfig | None,
                augment_configs: Mapping[str, TransformerConfig] | None,
                mesh: jax.sharding.Mesh | None = None,
                rules: partitioning.Rules = partitioning.STANDARD_RULES,
                remat: str = 'none') -> Setup:
  """Builds the model and parameter trees of `mode` (see the module docstring).

  Every parameter is created or restored directly in its sharding on `mesh` (default: a mesh
  of all devices): nothing is materialised whole on one host first. `remat` is the model's
  rematerialisation ('none', 'full', 'dots'): a composition's anchor layers above the first
  bridge, or every layer of a pretrained / fine-tuned LM.
  """
  mesh = mesh or partitioning.make_mesh()

  def lm_shardings(cfg):
    return partitioning.param_shardings(lm_abstract_params(cfg), mesh, rules)

  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; choose from {MODES}.')
  if mode == 'pretrain':
    if model_config is None:
      raise ValueError('pretrain needs a model_config (e.g. MODEL_CONFIG from gin/models/).')
    model = Transformer(model_config, remat=remat)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(model.init(key, tokens)['params']),
                   out_shardings=lm_shardings(model_config))
    return Setup(model, init(jax.random.key(seed)), {}, model_config)
  if anchor_checkpoint is None:
    raise ValueError(f'{mode} needs ANCHOR_CHECKPOINT.')
  anchor_cfg = _check_expected(anchor_checkpoint, anchor_config)
  _, anchor = checkpoints.load_lm(anchor_checkpoint, shardings=lm_shardings(anchor_cfg))
  if mode == 'finetune':
    patterns = tuple(trainable_patterns or (r'.*',))
    trained, frozen = trainable.split_params(anchor, patterns)
    return Setup(Transformer(anchor_cfg, remat=remat), trained, frozen, anchor_cfg)
  if not augment_checkpoints:
    raise ValueError('compose needs AUGMENT_CHECKPOINT (or augment_checkpoints).')
  augment_configs = dict(augment_configs or {})
  augments, augment_params = {}, {}
  for name, path in augment_checkpoints.items():
    augments[name] = _check_expected(path, augment_configs.get(name))
    augment_params[name] = checkpoints.load_lm(
        path, shardings=lm_shardings(augments[name]))[1]
  config = CalmConfig(anchor=anchor_cfg, augments=augments, bridges=dict(bridges or {}),
                      augment_as_encoder=augment_as_encoder)
  bridge_shardings = partitioning.param_shardings(
      calm_lib.abstract_params(config), mesh, rules)['bridge']
  trained = jax.jit(lambda key: calm_lib.init_bridge_params(config, key),
                    out_shardings={'bridge': bridge_shardings})(jax.random.key(seed))
  return Setup(calm_lib.Calm(config, remat=remat), trained,
               {'anchor': anchor, 'augments': augment_params})


CALM_RUN_FILE = 'calm_run.json'


def write_calm_run(model_dir: epath.Path, config: CalmConfig, anchor_checkpoint: str,
                   augment_checkpoints: Mapping[str, str]) -> None:
  """Records in MODEL_DIR what a composition run composes, so eval/export need MODEL_DIR only."""
  document = {
      'anchor_checkpoint': str(anchor_checkpoint),
      'augment_checkpoints': {k: str(v) for k, v in augment_checkpoints.items()},
      'bridges': {name: dataclasses.asdict(b) for name, b in config.bridges},
      'augment_as_encoder': config.augment_as_encoder,
  }
  (model_dir / CALM_RUN_FILE).write_text(json.dumps(document, indent=2))


def read_calm_run(model_dir: str | epath.Path) -> tuple[CalmConfig, dict[str, Any]]:
  """(CalmConfig, the frozen parameters) of a composition run directory."""
  document = json.loads((epath.Path(model_dir) / CALM_RUN_FILE).read_text())
  anchor_config, anchor = checkpoints.load_lm(document['anchor_checkpoint'])
  augments, augment_params = {}, {}
  for name, path in document['augment_checkpoints'].items():
    augments[name], augment_params[name] = checkpoints.load_lm(path)
  config = CalmConfig(anchor=anchor_config, augments=augments,
                      bridges={k: BridgeConfig(**v) for k, v in document['bridges'].items()},
                      augment_as_encoder=document['augment_as_encoder'])
  return config, {'anchor': anchor, 'augments': augment_params}


def _progress(step: int, total: int, metrics: Mapping[str, float], tokens_per_s: float,
              elapsed: float, first: int) -> str:
  done = step - first
  eta = elapsed / done * (total - step) if done else float('nan')
  return (f'step {step}/{total}  loss {metrics["loss"]:.4f}  acc {metrics["accuracy"]:.3f}  '
          f'lr {metrics["learning_rate"]:.2e}  {tokens_per_s:,.0f} tokens/s  ETA {eta:,.0f}s')


@gin.configurable(denylist=['log'])
def train(*, model_dir: str = gin.REQUIRED, mode: str = 'compose',
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          model_config: TransformerConfig | None = None, anchor_checkpoint: str | None = None,
          augment_checkpoints: Mapping[str, str] | None = None,
          augment_checkpoint: str | None = None,
          bridges: Mapping[str, BridgeConfig] | None = None, bridge: BridgeConfig | None = None,
          augment_as_encoder: bool = False, trainable_patterns: Sequence[str] | None = None,
          anchor_config: TransformerConfig | None = None,
          augment_config: TransformerConfig | None = None,
          optimizer_fn: Callable[..., Any] = optim.make_optimizer, z_loss: float = 0.0,
          seed: int = 0, pack: bool = False, split: str = 'train', log_every: int = 50,
          save_every: int = 500, keep_checkpoints: int = 3,
          mesh: partitioning.MeshConfig | None = None, remat: str = 'none',
          log: Callable[[str], None] = logging.info) -> dict[str, float]:
  """Trains per `mode` and returns the last logged metrics.

  Args:
    model_dir: the run's directory (MODEL_DIR), local or gs://.
    mode: 'pretrain', 'compose' or 'finetune'.
    mixture_or_task_name: SeqIO task or mixture (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: e.g. {'inputs': 16, 'targets': 8} (TASK_FEATURE_LENGTHS).
    train_steps: total steps (TRAIN_STEPS); a resumed run continues up to it.
    batch_size: global batch (BATCH_SIZE).
    model_config: pretrain: the LM to train (MODEL_CONFIG).
    anchor_checkpoint: compose / finetune: the anchor LM checkpoint (ANCHOR_CHECKPOINT).
    augment_checkpoints: compose: {name: LM checkpoint} of several augments.
    augment_checkpoint: compose: the one augment's checkpoint (AUGMENT_CHECKPOINT), named
      'augment'; ignored when augment_checkpoints is given.
    bridges: compose: {name: BridgeConfig}; `bridge` sets the single augment's.
    bridge: see `bridges`.
    augment_as_encoder: compose: the encoder ablation.
    trainable_patterns: finetune: regular expressions of trained parameter paths (default all).
    anchor_config: if set, the anchor checkpoint must have exactly this architecture.
    augment_config: if set, the single augment checkpoint must have this architecture.
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
    log: console sink (process 0 only).
  """
  gin_cli.check_required('train', locals())
  check_remat(remat)
  model_dir = epath.Path(model_dir)
  is_chief = jax.process_index() == 0
  if not is_chief:
    log = lambda _: None  # pylint: disable=unnecessary-lambda-assignment
  mesh_config = mesh or partitioning.MeshConfig()
  device_mesh = partitioning.make_mesh(mesh_config)
  rules = mesh_config.rules()
  log(f'mesh {dict(device_mesh.shape)} over {jax.device_count()} devices, '
      f'{jax.process_count()} process(es); {"FSDP" if mesh_config.fsdp else "standard"} rules')
  if is_chief:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / 'config.gin').write_text(gin.config_str())
  if augment_checkpoints is None and augment_checkpoint is not None:
    augment_checkpoints = {DEFAULT_AUGMENT: augment_checkpoint}
  if bridges is None and bridge is not None:
    bridges = {name: bridge for name in (augment_checkpoints or {DEFAULT_AUGMENT: None})}
  setup = build_setup(
      mode, seed=seed, model_config=model_config, anchor_checkpoint=anchor_checkpoint,
      augment_checkpoints=augment_checkpoints, bridges=bridges,
      augment_as_encoder=augment_as_encoder, trainable_patterns=trainable_patterns,
      anchor_config=anchor_config,
      augment_configs={DEFAULT_AUGMENT: augment_config} if augment_config else None,
      mesh=device_mesh, rules=rules, remat=remat)
  if mode == 'compose' and is_chief:
    write_calm_run(model_dir, setup.model.config, anchor_checkpoint, augment_checkpoints)
  optimizer, schedule = optimizer_fn(total_steps=train_steps)
  trained_shardings = jax.tree.map(lambda x: x.sharding, setup.trained)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, setup.frozen)
  state_shardings = TrainState(
      step=partitioning.replicated(device_mesh), params=trained_shardings,
      opt_state=partitioning.opt_state_shardings(optimizer, setup.trained, trained_shardings,
                                                 device_mesh))
  # The optimizer state is created in its sharding.
  state = jax.jit(lambda p: init_train_state(p, optimizer),
                  out_shardings=state_shardings)(setup.trained)
  checkpointer = checkpoints.RunCheckpointer(model_dir, keep_checkpoints)
  consumed = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    state, consumed = checkpointer.restore(latest, state)
    log(f'resumed from step {latest} ({consumed} batches consumed)')
  first = int(np.asarray(state.step.addressable_data(0)))
  trained_count = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  frozen_count = sum(int(np.size(x)) for x in jax.tree.leaves(setup.frozen))
  log(f'{mode}: {trained_count:,} trained and {frozen_count:,} frozen parameters; '
      f'steps {first} -> {train_steps}')
  dataset = data.get_dataset(mixture_or_task_name, task_feature_lengths, split, batch_size,
                             seed=seed, pack=pack, skip_batches=consumed)
  batches = data.as_numpy_batches(dataset)
  replicated = partitioning.replicated(device_mesh)
  step_fn = make_train_step(
      apply_fn_for(setup.model), optimizer, z_loss, mesh=device_mesh, rules=rules,
      in_shardings=(state_shardings, frozen_shardings,
                    partitioning.batch_sharding(device_mesh, rules), replicated),
      out_shardings=(state_shardings, replicated))
  writer = (metric_writers.SummaryWriter(str(model_dir / 'train')) if is_chief
            else metric_writers.MultiWriter([]))
  rng = jax.random.key(seed)
  last: dict[str, float] = {}
  run_start = window_start = time.perf_counter()
  window_tokens = 0
  for step in range(first, train_steps):
    batch = next(batches)  # This process's rows.
    state, metrics = step_fn(state, setup.frozen,
                             partitioning.global_batch(batch, device_mesh, rules), rng)
    done = step + 1
    if step == first:  # Throughput and ETA leave out the first step's compilation.
      jax.block_until_ready(state)
      run_start = window_start = time.perf_counter()
      log(f'compiled and ran step {done}')
    else:
      window_tokens += int(np.sum(batch['decoder_target_tokens'] != 0)) * jax.process_count()
    if done % log_every == 0 or done == train_steps:
      last = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
      if not np.isfinite(last['loss']):
        raise FloatingPointError(f'Non-finite loss {last["loss"]} at step {done}.')
      now = time.perf_counter()
      last['learning_rate'] = float(schedule(step))
      last['tokens_per_s'] = window_tokens / max(now - window_start, 1e-9)
      writer.write_scalars(done, last)
      log(_progress(done, train_steps, last, last['tokens_per_s'], now - run_start, first + 1))
      window_start, window_tokens = now, 0
    if done % save_every == 0 or done == train_steps:
      checkpointer.save(done, state, consumed + done - first)
  checkpointer.close()
  writer.flush()
  lm_dir = model_dir / 'lm'
  exported = (lm_dir / checkpoints.CONFIG_FILE).exists()
  if mode in ('pretrain', 'finetune') and (first < train_steps or not exported):
    # Every process writes its shards (orbax); process 0 writes config.json last.
    params = trainable.merge_params(state.params, setup.frozen)
    if is_chief and lm_dir.exists():
      lm_dir.rmtree()
    multihost_utils.sync_global_devices('calm_jax.train: lm dir cleared')
    checkpoints.save_lm(lm_dir, setup.lm_config, params,
                        metadata={'source': f'calm-train {mode}', 'steps': train_steps})
    log(f'wrote LM checkpoint {lm_dir}')
  return last


def main():
  """Console-script entry point (`calm-train`)."""
  gin_cli.gin_main(train)
