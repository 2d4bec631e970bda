"""Evaluation during training, as T5X's `train.py` does it.

Every `eval_period` steps (and before training with `run_eval_before_training`), a run may
evaluate the model it trains on:

  train_eval  a task or mixture, teacher-forced: per task, the mean loss and token accuracy over
              the first `eval_steps` batches of its eval split (the same batches every time).
  infer_eval  a task or mixture, decoded with the KV cache (greedy) and scored by the tasks' own
              seqio metrics through `seqio.Evaluator`.

Results go to TensorBoard under `MODEL_DIR/eval` with T5X's names (`training_eval/<task>/loss`,
`inference_eval/<task>/<metric>`), to `MODEL_DIR/eval/metrics.jsonl` (one line per evaluation:
the step and every number) and to the console. The schedule is a function of the step alone,
so a resumed run continues it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from etils import epath
import jax
import seqio

from calm_jax import data, decoding, eval as eval_lib, partitioning
from calm_jax.losses import cross_entropy_loss
from calm_jax.train_step import apply_fn_for
from calm_jax.trainable import merge_params

METRICS_FILE = 'metrics.jsonl'


class TrainEvaluator:
  """Teacher-forced loss and token accuracy of each task of a task or mixture.

  Args:
    model: the `Transformer` or `Calm` being trained.
    mixture_or_task_name: the task or mixture (its tasks are evaluated one by one).
    task_feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: global batch of an evaluation step.
    eval_steps: batches per task (fewer where the split is shorter).
    split: the eval split.
    mesh: the run's mesh.
    rules: its logical axis rules.
    trained_shardings: shardings of the trained tree.
    frozen_shardings: shardings of the frozen tree.
  """

  def __init__(self, model: Any, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int], batch_size: int, eval_steps: int,
               split: str, mesh: jax.sharding.Mesh, rules: partitioning.Rules,
               trained_shardings: Any, frozen_shardings: Any):
    self._mesh, self._rules = mesh, rules
    self._batches = {}
    for task in data.tasks_of(mixture_or_task_name):
      ds = data.get_dataset(task.name, task_feature_lengths, split, batch_size, shuffle=False,
                            num_epochs=1)
      self._batches[task.name] = list(data.as_numpy_batches(ds.take(eval_steps)))
      if not self._batches[task.name]:
        raise ValueError(f'train_eval task {task.name} has fewer than {batch_size} examples in '
                         f'split {split!r}: no batch to evaluate.')
    apply = apply_fn_for(model)

    def sums(trained, frozen, batch):
      with partitioning.activation_context(mesh, rules):
        logits = apply(merge_params(trained, frozen), batch)
      out = cross_entropy_loss(logits, batch['decoder_target_tokens'],
                               batch['decoder_loss_weights'])
      return {'loss': out.cross_entropy * out.weight_sum,
              'accuracy': out.accuracy * out.weight_sum, 'weight': out.weight_sum}

    self._sums = jax.jit(
        sums, in_shardings=(trained_shardings, frozen_shardings,
                            partitioning.batch_sharding(mesh, rules)),
        out_shardings=partitioning.replicated(mesh))

  def __call__(self, trained: Any, frozen: Any) -> dict[str, dict[str, float]]:
    """{task: {'loss', 'accuracy'}} at the parameters `trained` (+ `frozen`)."""
    results = {}
    for name, batches in self._batches.items():
      sums = [self._sums(trained, frozen, partitioning.global_batch(b, self._mesh, self._rules))
              for b in batches]  # Dispatched back to back; one transfer at the end.
      sums = jax.device_get([{k: v.addressable_data(0) for k, v in s.items()} for s in sums])
      total = {key: sum(float(s[key]) for s in sums) for key in sums[0]}
      weight = max(total['weight'], 1.0)
      results[name] = {'loss': total['loss'] / weight, 'accuracy': total['accuracy'] / weight}
    return results


class InferEvaluator:
  """Cached greedy decoding of a task or mixture, scored by its seqio metrics.

  Args:
    model: the `Transformer` or `Calm` being trained.
    mixture_or_task_name: the task or mixture.
    task_feature_lengths: TASK_FEATURE_LENGTHS; `targets` bounds the decode length.
    batch_size: decoding batch.
    split: the eval split.
    num_examples: examples per task (None: the whole split).
    log_dir: where seqio's JSON logger writes predictions.
  """

  def __init__(self, model: Any, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int], batch_size: int, split: str,
               num_examples: int | None, log_dir: epath.Path):
    if jax.process_count() > 1:
      raise ValueError('infer_eval during training runs in one process only; evaluate the '
                       'checkpoints with calm-eval instead.')
    self._evaluator, eos_id = eval_lib.make_evaluator(
        mixture_or_task_name, task_feature_lengths, split, num_examples, log_dir,
        loggers=(seqio.JSONLogger,))
    # Compiled once; each evaluation decodes at the parameters of its step.
    generate_fn = decoding.make_generate_fn(
        model, max_decode_len=task_feature_lengths['targets'], eos_id=eos_id)
    self._params = None
    self._predict_fn = eval_lib.predict_fn_of(generate_fn, lambda: self._params, batch_size)

  def __call__(self, params: Any, step: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the whole parameter tree `params` at `step`."""
    self._params = params
    try:
      metrics, _ = self._evaluator.evaluate(compute_metrics=True, step=step,
                                            predict_fn=self._predict_fn)
      return eval_lib.metric_values(metrics)
    finally:
      self._params = None


class PeriodicEval:
  """Runs the configured evaluators at their steps and records what they return.

  Args:
    model_dir: the run's directory; results go to `model_dir/eval`.
    train_evaluator: a `TrainEvaluator`, or None.
    infer_evaluator: an `InferEvaluator`, or None.
    eval_period: evaluate after every `eval_period` steps.
    writer: the `clu` metric writer of `model_dir/eval` (process 0), or a no-op one.
    log: console sink.
  """

  def __init__(self, model_dir: epath.Path, train_evaluator: TrainEvaluator | None,
               infer_evaluator: InferEvaluator | None, eval_period: int, writer: Any,
               log: Callable[[str], None]):
    self._dir = model_dir / 'eval'
    self._train, self._infer = train_evaluator, infer_evaluator
    self._period = eval_period
    self._writer, self._log = writer, log

  def due(self, step: int) -> bool:
    """Whether step `step` (steps done) is an evaluation step."""
    return step % self._period == 0

  def __call__(self, step: int, trained: Any, frozen: Any) -> dict[str, Any]:
    """Evaluates at `step` and records the results; returns them."""
    tick = time.perf_counter()
    results: dict[str, Any] = {}
    if self._train is not None:
      results['training_eval'] = self._train(trained, frozen)
    if self._infer is not None:
      results['inference_eval'] = self._infer(merge_params(trained, frozen), step)
    scalars = {f'{kind}/{task}/{name}': value for kind, tasks in results.items()
               for task, metrics in tasks.items() for name, value in metrics.items()}
    self._writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      self._dir.mkdir(parents=True, exist_ok=True)
      with (self._dir / METRICS_FILE).open('a') as f:
        f.write(json.dumps({'step': step, **results}, sort_keys=True) + '\n')
    shown = '  '.join(f'{key} {value:.4g}' for key, value in sorted(scalars.items()))
    self._log(f'eval at step {step} ({time.perf_counter() - tick:.1f}s): {shown}')
    return results


def read_metrics(model_dir: str | epath.Path) -> list[dict[str, Any]]:
  """The evaluations recorded in `model_dir/eval/metrics.jsonl`, in order."""
  file = epath.Path(model_dir) / 'eval' / METRICS_FILE
  if not file.exists():
    return []
  return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

