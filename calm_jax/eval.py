"""`calm-eval`: greedy decoding through seqio's Evaluator, metrics to TensorBoard and JSON.

CHECKPOINT is an LM checkpoint (a pretrain/finetune run's `MODEL_DIR/lm`, or `calm-convert`
output) or a composition run's MODEL_DIR (its `calm_run.json` names the frozen models; the
bridges come from its latest checkpoint). Metrics are written under `EVAL_DIR` (TensorBoard
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
from typing import Any, Mapping

from absl import logging
from etils import epath
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from calm_jax import checkpoints, data, decoding, gin_cli, trainable
from calm_jax.calm import Calm
from calm_jax.transformer import Transformer



def load_for_eval(checkpoint: str) -> tuple[Any, Any, str]:
  """(flax model, parameters, description) of an LM checkpoint or a composition run dir."""
  from calm_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  path = epath.Path(checkpoint)
  if (path / train_lib.CALM_RUN_FILE).exists():
    config, frozen = train_lib.read_calm_run(path)
    bridges = checkpoints.RunCheckpointer(path).restore_params()
    return Calm(config), trainable.merge_params(bridges, frozen), f'composition {path}'
  if (path / checkpoints.CONFIG_FILE).exists():
    config, params = checkpoints.load_lm(path)
    return Transformer(config), params, f'LM {path}'
  raise checkpoints.CheckpointError(
      f'{path} is neither an LM checkpoint (config.json) nor a composition run '
      f'({train_lib.CALM_RUN_FILE}).')


def make_predict_fn(model, params, batch_size: int, max_decode_len: int, eos_id: int):
  """seqio predict_fn: greedy decoding of every (index, features) of a cached eval dataset."""

  @jax.jit
  def decode(params, input_tokens, prompt_mask):
    def logits_fn(tokens):
      kwargs = {'prompt_mask': prompt_mask} if isinstance(model, Calm) else {}
      return model.apply({'params': params}, tokens, **kwargs).logits
    return decoding.greedy_decode(logits_fn, input_tokens, prompt_mask, max_decode_len, eos_id)

  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    outputs = []
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
      n = len(indices)
      pad = batch_size - n  # Fixed shapes: one compilation for every batch.
      tokens = np.pad(features['decoder_input_tokens'], ((0, pad), (0, 0)))
      prompt = np.pad(features['decoder_causal_attention'], ((0, pad), (0, 0)),
                      constant_values=0)
      prompt[n:, 0] = 1  # Padding rows: a one-token prompt, ignored.
      out = np.asarray(decode(params, jnp.asarray(tokens), jnp.asarray(prompt)))
      outputs.extend(zip(indices.tolist(), out[:n].tolist()))
    return outputs

  return predict_fn


@gin.configurable
def evaluate(*, checkpoint: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED, batch_size: int = 64,
             split: str = 'validation', eval_dir: str | None = None, step: int = 0,
             num_examples: int | None = None) -> dict[str, dict[str, float]]:
  """Evaluates a checkpoint on every task of a task or mixture.

  Args:
    checkpoint: LM checkpoint or composition run directory (CHECKPOINT).
    mixture_or_task_name: task or mixture to evaluate (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: {'inputs': ..., 'targets': ...}; targets bounds the decode length.
    batch_size: decoding batch.
    split: dataset split.
    eval_dir: where to write TensorBoard and JSON logs; default CHECKPOINT/eval.
    step: the step recorded with the metrics.
    num_examples: evaluate only the first n examples of each task.
  """
  gin_cli.check_required('evaluate', locals())
  model, params, description = load_for_eval(checkpoint)
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
