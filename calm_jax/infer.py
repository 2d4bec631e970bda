"""Inference (`calm-infer`): cached decoding of every example of a task or mixture, as JSONL.

As T5X's infer run: one file per task, `INFER_OUTPUT_DIR/{task}-{step:06d}.jsonl`, one JSON
object per example in dataset order: {"inputs": ..., "targets": ..., "prediction": ...,
"prediction_tokens": [...]} (texts decoded with the task's vocabulary). CHECKPOINT is anything
`calm_jax.runs.load_checkpoint` accepts (LM checkpoint, composition run, composed checkpoint).

  calm-infer --gin_file=runs/infer.gin --gin_file=tasks/kv_arithmetic.gin \
      --gin.CHECKPOINT="'/tmp/calm_kv/calm'" --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_eval'" \
      --gin.INFER_OUTPUT_DIR="'/tmp/calm_kv/infer'"
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping

from absl import logging
from etils import epath
import jax

from calm_jax import data, decoding, partitioning, runs


def _text(vocabulary, ids) -> str:
  ids = [int(i) for i in ids]
  if vocabulary.eos_id in ids:
    ids = ids[:ids.index(vocabulary.eos_id)]
  # Padding is the vocabulary's (0 in T5X's; a byte-level BPE vocabulary's id 0 is a token).
  return vocabulary.decode([i for i in ids if i != vocabulary.pad_id])


def infer(*, checkpoint: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
          output_dir: str, batch_size: int = 64, split: str = 'validation',
          num_examples: int | None = None, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, num_beams: int = 1, length_penalty: float = 0.0, seed: int = 0,
          mesh: partitioning.MeshConfig | None = None,
          log: Callable[[str], None] = logging.info) -> dict[str, str]:
  """Writes the predictions of a checkpoint for every task of a task or mixture.

  Args:
    checkpoint: LM checkpoint, composition run or composed checkpoint (CHECKPOINT).
    mixture_or_task_name: MIXTURE_OR_TASK_NAME.
    task_feature_lengths: {'inputs': ..., 'targets': ...}; targets bounds the decode length.
    output_dir: where the JSONL files go (INFER_OUTPUT_DIR; local or gs://).
    batch_size: decoding batch.
    split: dataset split.
    num_examples: only the first n examples of each task.
    temperature, top_k, top_p: sampling (see `calm_jax.decoding.Sampling`); 0 is greedy.
    num_beams, length_penalty: beam search when num_beams > 1.
    seed: PRNG seed of sampling (batch i uses fold_in(seed, i)).
    mesh: decode on this device mesh (the gin mesh files: batch over replica x data, heads,
      MLP and vocabulary over model; `decoding.make_generate_fn`), or None: one device. With
      several processes (`--coordinator_address`, `--multiprocess`) each feeds the rows of
      its own devices and process 0 writes the files.
    log: progress sink.

  A composition whose augment reads its own tokenization (`CalmConfig.own_tokenizer`)
  decodes from each example's prompt text (`decoding.generate_aligned_texts`; greedy, sampled
  or beam search alike): the augment re-tokenizes the text as the anchor writes it, in the
  vocabulary the run carries.

  Returns:
    {task name: path of its JSONL file}.

  Raises:
    ValueError: a task whose augment stream is in another vocabulary than the run's.
  """
  chief = jax.process_index() == 0
  if not chief:
    log = lambda _: None  # pylint: disable=unnecessary-lambda-assignment
  device_mesh, rules, placement = None, None, None
  if mesh is not None:  # Parameters are restored straight into their shardings.
    device_mesh, rules = decoding.decoding_mesh(mesh, batch_size)
    placement = decoding.mesh_placement(device_mesh, rules)
  loaded = runs.load_checkpoint(checkpoint, shardings=placement)
  own = tuple(getattr(getattr(loaded.model, 'config', None), 'own_tokenizer', ()))
  sampling = decoding.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  params = loaded.params
  if device_mesh is not None:
    log(f'decoding on mesh {dict(device_mesh.shape)}')
  out_dir = epath.Path(output_dir)
  if chief:
    out_dir.mkdir(parents=True, exist_ok=True)
  written = {}
  generate_fns = {}
  for task in data.tasks_of(mixture_or_task_name):
    vocabulary = task.output_features['targets'].vocabulary
    key = vocabulary.eos_id
    if key not in generate_fns and not own:
      generate_fns[key] = decoding.make_generate_fn(
          loaded.model, max_decode_len=task_feature_lengths['targets'], eos_id=vocabulary.eos_id,
          sampling=sampling, num_beams=num_beams, length_penalty=length_penalty,
          mesh=device_mesh, rules=rules)
    converter = data.feature_converter(task, pack=False)
    raw = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False,
                           num_epochs=1, use_cached=False)
    if num_examples is not None:
      raw = raw.take(num_examples)
    examples = list(raw.as_numpy_iterator())
    if own:
      batches = _aligned_batches(loaded, own[0], task, examples,
                                 task_feature_lengths['targets'], batch_size, sampling=sampling,
                                 num_beams=num_beams, length_penalty=length_penalty, seed=seed)
    else:
      features = converter(raw, dict(task_feature_lengths)).batch(batch_size)
      batches = decoding.decode_batches(generate_fns[key], params,
                                        features.as_numpy_iterator(), batch_size, seed,
                                        mesh=device_mesh, rules=rules)
    path = out_dir / f'{task.name}-{loaded.step:06d}.jsonl'
    tmp = path.parent / (path.name + '.tmp')
    start, count = time.perf_counter(), 0
    # Every process decodes (the batches are global); process 0 alone writes.
    with (tmp.open('w') if chief else open(os.devnull, 'w')) as f:
      for n, out in batches:
        for example, tokens in zip(examples[count:count + n], out):
          record = {'prediction': _text(vocabulary, tokens),
                    'prediction_tokens': [int(t) for t in tokens]}
          for feature in ('inputs', 'targets'):
            if feature in example:
              record[feature] = _text(task.output_features[feature].vocabulary,
                                      example[feature])
          f.write(json.dumps(record) + '\n')
        count += n
    if chief:
      tmp.replace(path)  # A complete file or none.
    seconds = time.perf_counter() - start
    log(f'{task.name}: {count} predictions in {seconds:.1f}s '
        f'({count / max(seconds, 1e-9):.1f} examples/s, compilation included) -> {path}')
    written[task.name] = str(path)
  return written


def _aligned_batches(loaded: runs.Loaded, name: str, task, examples, max_decode_len: int,
                     batch_size: int, **decode_kwargs):
  """(n, tokens) per batch of an own-tokenizer composition, decoded from the prompt texts."""
  from calm_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  outs = decoding.generate_aligned_texts(
      loaded.model, loaded.params, eval_lib.prompt_texts(examples),
      anchor_vocabulary=task.output_features['targets'].vocabulary,
      augment_vocabulary=eval_lib.augment_vocabulary_for(loaded, name, task.name),
      max_decode_len=max_decode_len, batch_size=batch_size, **decode_kwargs)
  for out in outs:
    yield len(out), out
