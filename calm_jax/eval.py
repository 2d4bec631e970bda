"""Evaluation (`calm-eval`): cached greedy decoding through seqio's Evaluator, metrics to
TensorBoard and JSON.

CHECKPOINT is an LM checkpoint (a pretrain/finetune run's `MODEL_DIR/lm`, or `calm-convert`
output), a composition run's MODEL_DIR (its `calm_run.json` names the frozen models; the
bridges come from its latest checkpoint) or a composed checkpoint (`calm-export`); see
`calm_jax.runs`. Metrics are written under `EVAL_DIR` (TensorBoard summaries and seqio's JSON logs) and returned as {task: {metric: value}}.

  calm-eval --gin_file=runs/eval.gin --gin_file=tasks/kv_arithmetic.gin \
      --gin.CHECKPOINT="'/tmp/compose'" --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_held_out'"
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import seqio

from calm_jax import data, decoding, partitioning, runs


def make_predict_fn(model: Any, params: Any, batch_size: int, max_decode_len: int,
                    eos_id: int, *, sampling: decoding.Sampling = decoding.Sampling(), num_beams: int = 1,
                    seed: int = 0, mesh: Any = None, rules: Any = None):
  """seqio predict_fn: cached decoding (greedy by default) of a cached eval dataset (on
  `mesh` with `rules` when given: `decoding.make_generate_fn`; `params` already placed)."""
  generate_fn = decoding.make_generate_fn(model, max_decode_len=max_decode_len, eos_id=eos_id,
                                          sampling=sampling, num_beams=num_beams, mesh=mesh,
                                          rules=rules)
  return predict_fn_of(generate_fn, lambda: params, batch_size, seed)


def predict_fn_of(generate_fn: Callable[..., Any], params_fn: Callable[[], Any], batch_size: int,
                  seed: int = 0):
  """seqio predict_fn decoding with `generate_fn` (compiled once) at the parameters
  `params_fn()` returns when it is called (evaluation during training passes each step's)."""
  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    indices, batches = [], []
    for index, features in dataset.batch(batch_size).as_numpy_iterator():
      indices.append(index.tolist())
      batches.append(features)
    outputs = []
    for index, (_, out) in zip(indices, decoding.decode_batches(generate_fn, params_fn(),
                                                                 batches, batch_size, seed)):
      outputs.extend(zip(index, out.tolist()))
    return outputs

  return predict_fn


def augment_vocabulary_for(loaded: runs.Loaded, name: str, task_name: str) -> Any:
  """The own vocabulary of augment `name` of `loaded` for decoding task `task_name`: the one
  the checkpoint carries (else the task's augment stream's), which the task must not contradict.

  Raises:
    ValueError: neither carries one, or they differ.
  """
  from calm_jax import alignment  # pylint: disable=g-import-not-at-top
  vocabulary = loaded.augment_vocabularies.get(name)
  task_vocabulary = alignment.task_augment_vocabulary(task_name)
  if vocabulary is None:
    vocabulary = task_vocabulary
  if vocabulary is None:
    raise ValueError(f'augment {name!r} reads its own tokenization, but neither the checkpoint '
                     f'nor task {task_name} carries its vocabulary.')
  if task_vocabulary is not None and not alignment.same_vocabulary(task_vocabulary, vocabulary):
    raise ValueError(f'task {task_name} tokenizes the augment stream in another vocabulary '
                     f'than the one augment {name!r} was composed with.')
  return vocabulary


def prompt_texts(examples: Sequence[Mapping[str, Any]]) -> list[str]:
  """Each task example's prompt text ('inputs_pretokenized'; '' for LM tasks)."""
  out = []
  for example in examples:
    text = example.get('inputs_pretokenized', b'')
    out.append(text.decode('utf-8') if isinstance(text, bytes) else str(text))
  return out


def make_aligned_predict_fn(evaluator: seqio.Evaluator, loaded: runs.Loaded, name: str,
                            batch_size: int, max_decode_len: int):
  """seqio predict_fn of a composition whose augment `name` reads its own tokenization:
  greedy `decoding.generate_aligned_texts` from the prompt texts of the evaluator's task
  examples (the model features do not hold the text the augment re-tokenizes)."""
  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    task_name = next(n for n, ds in evaluator.cached_model_datasets.items() if ds is dataset)
    task = next(t for t in evaluator.eval_tasks if t.name == task_name)
    indices = [int(i) for i, _ in dataset.as_numpy_iterator()]
    examples = list(evaluator.cached_task_datasets[task_name].as_numpy_iterator())
    prompts = prompt_texts([examples[i] for i in indices])
    outputs = []
    batches = decoding.generate_aligned_texts(
        loaded.model, loaded.params, prompts,
        anchor_vocabulary=task.output_features['targets'].vocabulary,
        augment_vocabulary=augment_vocabulary_for(loaded, name, task_name),
        max_decode_len=max_decode_len, batch_size=batch_size)
    position = 0
    for out in batches:
      outputs.extend(zip(indices[position:position + len(out)], out.tolist()))
      position += len(out)
    return outputs

  return predict_fn


# A metric of this name carries per-example results (a seqio.metrics.Text of JSON lines: the
# code domain's per-problem pass/fail), which ResultsLogger writes beside the predictions.
RESULTS_METRIC = 'per_problem'


class ResultsLogger(seqio.Logger):
  """Writes a task's RESULTS_METRIC as `{task}-{step:06}-results.jsonl`, beside seqio's
  `{task}-{step:06}.jsonl` predictions (JSONLogger)."""

  def __call__(self, task_name: str, step: int | None, metrics: Mapping[str, Any],
               dataset: Any, inferences: Any, targets: Any) -> None:
    """seqio.Logger: writes RESULTS_METRIC where `metrics` has it."""
    del dataset, inferences, targets
    value = metrics.get(RESULTS_METRIC)
    if value is None:
      return
    step = -1 if step is None else step
    path = epath.Path(self.output_dir) / f'{task_name}-{step:06}-results.jsonl'
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(value.textdata.rstrip('\n') + '\n')
    tmp.replace(path)


def make_evaluator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                   split: str, num_examples: int | None, log_dir: epath.Path,
                   loggers: Sequence[type[seqio.Logger]] = (seqio.TensorBoardLogger,
                                                             seqio.JSONLogger, ResultsLogger)
                   ) -> tuple[seqio.Evaluator, int]:
  """(seqio Evaluator of a task or mixture writing to `log_dir`, its EOS id).

  Args:
    mixture_or_task_name: the task or mixture.
    task_feature_lengths: TASK_FEATURE_LENGTHS.
    split: the eval split.
    num_examples: examples per task (None: the whole split).
    log_dir: created if absent (seqio's JSONLogger does not create it).
    loggers: seqio logger classes.
  """
  task = data.get_task_or_mixture(mixture_or_task_name)
  log_dir.mkdir(parents=True, exist_ok=True)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=data.feature_converter(task, pack=False), eval_split=split,
      sequence_length=dict(task_feature_lengths), num_examples=num_examples,
      logger_cls=list(loggers), log_dir=str(log_dir))
  return evaluator, next(iter(task.output_features.values())).vocabulary.eos_id


def metric_values(metrics: Any) -> dict[str, dict[str, float]]:
  """{task: {metric: float}} of `seqio.Evaluator.evaluate`'s (future) metrics (scalars only:
  text metrics such as RESULTS_METRIC go to the loggers)."""
  return {name: {k: float(getattr(v, 'value', v)) for k, v in task_metrics.items()
                 if not isinstance(v, seqio.metrics.Text)}
          for name, task_metrics in metrics.result().items()}


def evaluate(*, checkpoint: str, mixture_or_task_name: str,
             task_feature_lengths: Mapping[str, int], batch_size: int = 64,
             split: str = 'validation', eval_dir: str | None = None, step: int | None = None,
             num_examples: int | None = None,
             mesh: partitioning.MeshConfig | None = None) -> dict[str, dict[str, float]]:
  """Evaluates a checkpoint on every task of a task or mixture.

  A composition whose augment reads its own tokenization decodes greedily from each
  example's prompt text (`make_aligned_predict_fn`).

  Args:
    checkpoint: LM checkpoint or composition run directory (CHECKPOINT).
    mixture_or_task_name: task or mixture to evaluate (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: {'inputs': ..., 'targets': ...}; targets bounds the decode length.
    batch_size: decoding batch.
    split: dataset split.
    eval_dir: where to write TensorBoard and JSON logs; default CHECKPOINT/eval.
    step: the step recorded with the metrics; default the checkpoint's training step.
    num_examples: evaluate only the first n examples of each task.
    mesh: decode on this device mesh (as `calm_jax.infer.infer`), or None: one device.
  """
  device_mesh, rules, placement = None, None, None
  if mesh is not None:  # Refuses own-tokenizer compositions, saying why, before reading.
    device_mesh, rules = decoding.decoding_mesh(mesh, batch_size)
    placement = decoding.mesh_placement(device_mesh, rules)
  loaded = runs.load_checkpoint(checkpoint, shardings=placement)
  model, params, description = loaded.model, loaded.params, loaded.description
  step = loaded.step if step is None else step
  evaluator, eos_id = make_evaluator(
      mixture_or_task_name, task_feature_lengths, split, num_examples,
      epath.Path(eval_dir or epath.Path(checkpoint) / 'eval'))
  own = tuple(getattr(getattr(model, 'config', None), 'own_tokenizer', ()))
  if own:
    predict_fn = make_aligned_predict_fn(evaluator, loaded, own[0], batch_size,
                                         task_feature_lengths['targets'])
  else:
    predict_fn = make_predict_fn(model, params, batch_size, task_feature_lengths['targets'],
                                 eos_id, mesh=device_mesh, rules=rules)
  metrics, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn)
  results = metric_values(metrics)
  logging.info('%s: %s', description, json.dumps(results))
  return results
