"""`calm-eval`: cached greedy decoding through seqio's Evaluator, metrics to TensorBoard and JSON.

CHECKPOINT is an LM checkpoint (a pretrain/finetune run's `MODEL_DIR/lm`, or `calm-convert`
output), a composition run's MODEL_DIR (its `calm_run.json` names the frozen models; the
bridges come from its latest checkpoint) or a composed checkpoint (`calm-export`). Metrics are written under `EVAL_DIR` (TensorBoard
summaries and seqio's JSON logs) and returned as {task: {metric: value}}.

  calm-eval --gin_file=runs/eval.gin --gin_file=tasks/kv_arithmetic.gin \
      --gin.CHECKPOINT="'/tmp/compose'" --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_held_out'"
"""

from __future__ import annotations

if __name__ == '__main__':
  # `python -m calm_jax.eval`: run the importable module, so that gin registers its configurable
  # once, under the name the gin files use (not also as `__main__.*`).
  from calm_jax.eval import main as _main  # pylint: disable=g-import-not-at-top
  _main()
  raise SystemExit(0)

import json
from typing import Any, Mapping, NamedTuple

from absl import logging
from etils import epath
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from calm_jax import checkpoints, composed, data, decoding, gin_cli, trainable
from calm_jax.calm import Calm
from calm_jax.transformer import Transformer


class Loaded(NamedTuple):
  """A model ready to decode.

  Attributes:
    model: the flax module (`Transformer` or `Calm`).
    params: its parameters.
    description: what was loaded, for logs.
    step: the training step of the checkpoint (0 where unknown).
    vocabulary: the exported vocabulary (composed checkpoints), else None.
  """

  model: Any
  params: Any
  description: str
  step: int
  vocabulary: Any = None


def load_for_eval(checkpoint: str) -> Loaded:
  """Loads an LM checkpoint, a composition run directory or a composed checkpoint."""
  from calm_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  path = epath.Path(checkpoint)
  if (path / train_lib.CALM_RUN_FILE).exists():
    config, frozen = train_lib.read_calm_run(path)
    checkpointer = checkpoints.RunCheckpointer(path)
    step = checkpointer.latest_step()
    bridges = checkpointer.restore_params()
    return Loaded(Calm(config), trainable.merge_params(bridges, frozen),
                  f'composition {path} step {step}', int(step or 0))
  if composed.is_composed(path):
    loaded = composed.load_composed(path)
    step = int(loaded.metadata.get('step', 0))
    return Loaded(loaded.model, loaded.params, f'composed checkpoint {path}', step,
                  loaded.vocabulary)
  if (path / checkpoints.CONFIG_FILE).exists():
    config, params = checkpoints.load_lm(path)
    return Loaded(Transformer(config), params, f'LM {path}', 0)
  if not path.exists():
    raise checkpoints.CheckpointError(f'Checkpoint {path} does not exist.')
  raise checkpoints.CheckpointError(
      f'{path} is neither an LM checkpoint ({checkpoints.CONFIG_FILE}), a composition run '
      f'({train_lib.CALM_RUN_FILE}) nor a composed checkpoint ({composed.CONFIG_FILE}).')


def decode_batches(generate_fn, params, batches, batch_size: int, seed: int = 0):
  """Yields (number of real rows, [n, max_decode_len] tokens) per batch of model features.

  Batches are padded to `batch_size` rows so that every call has one shape (one compilation).
  Features without `decoder_causal_attention` (LM tasks) decode from the first token alone.
  """
  for i, features in enumerate(batches):
    tokens = features['decoder_input_tokens']
    n = len(tokens)
    pad = batch_size - n
    prompt = features.get('decoder_causal_attention')
    if prompt is None:
      prompt = np.zeros_like(tokens)
      prompt[:, 0] = 1
    tokens = np.pad(tokens, ((0, pad), (0, 0)))
    prompt = np.pad(prompt, ((0, pad), (0, 0)), constant_values=0)
    prompt[n:, 0] = 1  # Padding rows: a one-token prompt, ignored.
    out = generate_fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(prompt, jnp.int32),
                      jax.random.fold_in(jax.random.key(seed), i))
    yield n, np.asarray(out)[:n]


def make_predict_fn(model, params, batch_size: int, max_decode_len: int, eos_id: int, *,
                    sampling: decoding.Sampling = decoding.Sampling(), num_beams: int = 1,
                    seed: int = 0):
  """seqio predict_fn: cached decoding (greedy by default) of a cached eval dataset."""
  generate_fn = decoding.make_generate_fn(model, max_decode_len=max_decode_len, eos_id=eos_id,
                                          sampling=sampling, num_beams=num_beams)

  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    indices, batches = [], []
    for index, features in dataset.batch(batch_size).as_numpy_iterator():
      indices.append(index.tolist())
      batches.append(features)
    outputs = []
    for index, (_, out) in zip(indices, decode_batches(generate_fn, params, batches,
                                                        batch_size, seed)):
      outputs.extend(zip(index, out.tolist()))
    return outputs

  return predict_fn


@gin.configurable
def evaluate(*, checkpoint: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED, batch_size: int = 64,
             split: str = 'validation', eval_dir: str | None = None, step: int | None = None,
             num_examples: int | None = None) -> dict[str, dict[str, float]]:
  """Evaluates a checkpoint on every task of a task or mixture.

  Args:
    checkpoint: LM checkpoint or composition run directory (CHECKPOINT).
    mixture_or_task_name: task or mixture to evaluate (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: {'inputs': ..., 'targets': ...}; targets bounds the decode length.
    batch_size: decoding batch.
    split: dataset split.
    eval_dir: where to write TensorBoard and JSON logs; default CHECKPOINT/eval.
    step: the step recorded with the metrics; default the checkpoint's training step.
    num_examples: evaluate only the first n examples of each task.
  """
  gin_cli.check_required('evaluate', locals())
  model, params, description, checkpoint_step, _ = load_for_eval(checkpoint)
  step = checkpoint_step if step is None else step
  task = data.get_task_or_mixture(mixture_or_task_name)
  eval_dir = epath.Path(eval_dir or epath.Path(checkpoint) / 'eval')
  eval_dir.mkdir(parents=True, exist_ok=True)  # seqio's JSONLogger does not create it.
  evaluator = seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=data.feature_converter(task, pack=False), eval_split=split,
      sequence_length=dict(task_feature_lengths), num_examples=num_examples,
      logger_cls=[seqio.TensorBoardLogger, seqio.JSONLogger], log_dir=str(eval_dir))
  eos_id = next(iter(task.output_features.values())).vocabulary.eos_id
  predict_fn = make_predict_fn(model, params, batch_size, task_feature_lengths['targets'],
                               eos_id)
  metrics, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn)
  results = {name: {k: float(getattr(v, 'value', v)) for k, v in task_metrics.items()}
             for name, task_metrics in metrics.result().items()}
  logging.info('%s: %s', description, json.dumps(results))
  return results


def main():
  """Console-script entry point (`calm-eval`)."""
  gin_cli.gin_main(evaluate)
