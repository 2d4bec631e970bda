"""Export (`calm-export`): a composed checkpoint (one directory, ready to generate) and a serving artifact.

CHECKPOINT is a composition run's MODEL_DIR: the frozen models it names (`calm_run.json`) and
the bridges of its latest checkpoint are written together under EXPORT_DIR with the composed
config and the vocabulary of MIXTURE_OR_TASK_NAME (see `calm_jax.composed`). With
SERVING_PROMPT_LENGTH set, the generate function is also exported through `jax.export` with a
symbolic batch size (and, with `export.saved_model = True`, as a TF SavedModel via jax2tf).

  calm-export --gin_file=runs/export.gin --gin_file=tasks/kv_arithmetic.gin \
      --gin.CHECKPOINT="'/tmp/calm_kv/calm'" --gin.EXPORT_DIR="'/tmp/calm_kv/export'" \
      --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_held_out'"
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import logging
from etils import epath
import jax

from calm_jax import checkpoints, composed, data, decoding, partitioning, runs
from calm_jax.calm import Calm


def export(*, checkpoint: str, output_dir: str, mixture_or_task_name: str | None = None,
           serving_prompt_length: int | None = None, max_decode_len: int = 32, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, num_beams: int = 1, platforms: Sequence[str] | None = None,
           saved_model: bool = False, mesh: partitioning.MeshConfig | None = None,
           log: Callable[[str], None] = logging.info) -> composed.Composed:
  """Writes a composed checkpoint, optionally with its serving artifact.

  Args:
    checkpoint: a composition run directory (CHECKPOINT) or an existing composed checkpoint
      (then only the serving artifact is written).
    output_dir: the composed checkpoint directory (EXPORT_DIR; local or gs://; must be new).
    mixture_or_task_name: the task whose vocabulary is exported with the model; None: none.
    serving_prompt_length: width P of the serving artifact's prompt arrays; None: no artifact.
    max_decode_len: tokens the serving artifact generates.
    temperature, top_k, top_p, num_beams: decoding of the serving artifact (greedy default).
    platforms: lowering platforms of the artifact, e.g. ['cpu', 'tpu']; default this machine's.
    saved_model: also write a TF SavedModel (jax2tf) of the artifact (one device only).
    mesh: load and write on this device mesh (the gin mesh files; `decoding.mesh_placement`):
      every parameter is restored straight into its sharding and written shard by shard by
      the process that holds it, so a composition too large for one device exports; the
      serving artifact is then the mesh's generate function (as many devices, the batch a
      multiple of the mesh's batch axes). None: one device.
    log: progress sink.

  Returns:
    The exported model, loaded back from `output_dir`.
  """
  out = epath.Path(output_dir)
  if jax.process_index() != 0:
    log = lambda _: None  # pylint: disable=unnecessary-lambda-assignment
  vocabulary = None
  if mixture_or_task_name is not None:
    vocabulary = data.tasks_of(mixture_or_task_name)[0].output_features['targets'].vocabulary
  device_mesh = rules = placement = composed_placement = None
  if mesh is not None:
    if saved_model:
      raise ValueError('the TF SavedModel is written for one device: export it without a mesh.')
    device_mesh, rules = partitioning.make_mesh(mesh), mesh.rules()
    placement = decoding.mesh_placement(device_mesh, rules)
    composed_placement = lambda config: placement(Calm(config))  # pylint: disable=unnecessary-lambda-assignment
    log(f'exporting on mesh {dict(device_mesh.shape)}')
  if composed.is_composed(checkpoint) and epath.Path(checkpoint) == out:
    log(f'{out} is already a composed checkpoint; writing the serving artifact only')
  else:
    loaded = runs.load_checkpoint(checkpoint, shardings=placement)
    if not isinstance(loaded.model, Calm):
      raise checkpoints.CheckpointError(
          f'{checkpoint} is an LM checkpoint; calm-export exports compositions.')
    params = loaded.params if mesh is not None else jax.device_get(loaded.params)
    composed.save_composed(out, loaded.model.config, params,
                           vocabulary=vocabulary or loaded.vocabulary,
                           metadata={'source': str(checkpoint), 'step': loaded.step},
                           augment_vocabularies=loaded.augment_vocabularies)
    log(f'wrote composed checkpoint {out} (step {loaded.step})')
    del loaded, params
  result = composed.load_composed(out, shardings=composed_placement)
  if serving_prompt_length is not None:
    eos_id = result.vocabulary.eos_id if result.vocabulary is not None else 1
    signature = composed.export_serving(
        out, result, prompt_length=serving_prompt_length, max_decode_len=max_decode_len,
        eos_id=eos_id, num_beams=num_beams, platforms=platforms, saved_model=saved_model,
        sampling=decoding.Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
        mesh=device_mesh, rules=rules)
    log(f'wrote serving artifact {out / composed.SERVING_DIR} for {signature["platforms"]}'
        f'{" on %d devices" % signature["devices"] if mesh is not None else ""}'
        f'{" and a TF SavedModel" if saved_model else ""}')
  return result
