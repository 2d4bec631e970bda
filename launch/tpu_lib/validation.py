"""Checks of the flags: accelerator types and their hosts, names, zones, workers and paths."""

from __future__ import annotations

import ast
import re
from typing import Optional, Sequence

from .quoting import SAFE
from .steps import LaunchError

# Accelerator families: FAMILY-SIZE. For v2, v3, v4 and v5p SIZE counts TensorCores (8 a host);
# for v5litepod (v5e) and v6e it counts chips (up to 8 on one host, 4 a host in larger slices).
CORE_COUNTED = ('v2', 'v3', 'v4', 'v5p')
CHIP_COUNTED = ('v5litepod', 'v6e')
CHIP_COUNTED_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5p': 'v2-alpha-tpuv5',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v6e': 'v2-alpha-tpuv6e',
}
ACCELERATOR_EXAMPLES = 'v5litepod-16, v5p-128, v4-32, v6e-8'

# gin macros naming paths that every worker reads or writes.
PATH_MACROS = ('MODEL_DIR', 'CHECKPOINT', 'ANCHOR_CHECKPOINT', 'AUGMENT_CHECKPOINT', 'EVAL_DIR',
               'INFER_OUTPUT_DIR', 'EXPORT_DIR', 'EXPERIMENT_DIR')


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
  """Splits and checks an accelerator type such as `v5litepod-16`.

  Args:
    accelerator_type: FAMILY-SIZE, e.g. v5litepod-16, v5p-128, v4-32, v6e-8.

  Returns:
    The family and the size.

  Raises:
    LaunchError: an unknown family or an impossible size.
  """
  families = CORE_COUNTED + CHIP_COUNTED
  accelerator_type = accelerator_type or ''
  match = re.fullmatch(r'([a-z0-9]+)-([1-9][0-9]*)', accelerator_type)
  if not match or match.group(1) not in families:
    hint = ''
    if accelerator_type.startswith('v5e-'):
      hint = '; v5e slices are named v5litepod-N'
    raise LaunchError(
        f'bad accelerator type {accelerator_type!r}: expected FAMILY-SIZE with FAMILY one of '
        f'{", ".join(families)} (e.g. {ACCELERATOR_EXAMPLES}){hint}')
  family, size = match.group(1), int(match.group(2))
  if family in CORE_COUNTED and size % 8:
    raise LaunchError(f'bad accelerator type {accelerator_type!r}: {family} sizes count '
                      'TensorCores, a multiple of 8 (e.g. v4-32)')
  if family in CHIP_COUNTED and size not in CHIP_COUNTED_SIZES:
    sizes = ', '.join(str(s) for s in CHIP_COUNTED_SIZES)
    raise LaunchError(f'bad accelerator type {accelerator_type!r}: {family} comes in sizes '
                      f'{sizes}')
  return family, size


def num_workers(accelerator_type: str) -> int:
  """The number of hosts (TPU VM workers) of a slice.

  Args:
    accelerator_type: a valid accelerator type, e.g. v4-32.

  Returns:
    How many workers `--worker=all` reaches, e.g. 4 for v4-32 and v5litepod-16.
  """
  family, size = parse_accelerator_type(accelerator_type)
  if family in CORE_COUNTED:
    return max(1, size // 8)
  return 1 if size <= 8 else size // 4


def default_runtime_version(accelerator_type: str) -> str:
  """The TPU software version recommended for JAX on an accelerator type.

  Args:
    accelerator_type: a valid accelerator type.

  Returns:
    e.g. `v2-alpha-tpuv5-lite` for v5litepod-16.
  """
  return RUNTIME_VERSIONS[parse_accelerator_type(accelerator_type)[0]]


def check_name(name: Optional[str]) -> str:
  """Checks --name, the name of the TPU VM (and of its queued resource).

  Args:
    name: the flag's value; None when neither the flag nor TPU_NAME is set.

  Returns:
    The name.

  Raises:
    LaunchError: a missing name, or one that Cloud TPU does not accept.
  """
  if not name:
    raise LaunchError('missing --name (or set TPU_NAME): the name of the TPU VM')
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', name):
    raise LaunchError(f'bad --name {name!r}: lower-case letters, digits and dashes, starting '
                      'with a letter')
  return name


def check_zone(zone: Optional[str]) -> str:
  """Checks --zone.

  Args:
    zone: the flag's value, e.g. us-central2-b; None when neither the flag nor TPU_ZONE is set.

  Returns:
    The zone.

  Raises:
    LaunchError: a missing zone, or a region or other word in its place.
  """
  if not zone:
    raise LaunchError('missing --zone (or set TPU_ZONE), e.g. --zone=us-central2-b')
  if not re.fullmatch(r'[a-z]+-[a-z]+[0-9]+-[a-z]', zone):
    raise LaunchError(f'bad --zone {zone!r}: expected a zone such as us-central2-b, not a region')
  return zone


def check_worker(worker: str) -> str:
  """Checks --worker.

  Args:
    worker: 'all', an index (0), a list (0,2) or a range (1-3).

  Returns:
    The worker selection.

  Raises:
    LaunchError: any other value.
  """
  if not re.fullmatch(r'all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*', worker):
    raise LaunchError(f"bad --worker {worker!r}: expected 'all', an index (0), a list (0,2) or "
                      'a range (1-3)')
  return worker


def check_job(job: str) -> str:
  """Checks --job, which names the files logs/JOB.log and logs/JOB.pid on the workers.

  Args:
    job: the job name.

  Returns:
    The job name.

  Raises:
    LaunchError: a name with characters other than letters, digits, dots, dashes, underscores.
  """
  if not re.fullmatch(r'[A-Za-z0-9_.-]+', job):
    raise LaunchError(f'bad --job {job!r}: letters, digits, dots, dashes and underscores only')
  return job


def remote_path(path: str) -> str:
  """A path on the workers, relative to the home directory unless absolute.

  Args:
    path: e.g. `calm_jax`, `~/calm_jax` or `/mnt/disk/calm_jax`.

  Returns:
    The path without a leading `~/` (quoting would stop the shell from expanding it).

  Raises:
    LaunchError: a path with characters that would need quoting.
  """
  if path.startswith('~/'):
    path = path[2:]
  path = path.rstrip('/') if path != '/' else path
  if not SAFE.fullmatch(path or '~'):
    raise LaunchError(f'bad --remote-dir {path!r}: use letters, digits and ./_-, relative to the '
                      'home directory or absolute')
  return path


def gin_path_warnings(command: Sequence[str], accelerator_type: Optional[str]) -> list[str]:
  """Warnings for gin path macros that are not gs:// paths where the workers share no disk.

  Args:
    command: the argv run on every worker, e.g. calm-train with `--gin.MODEL_DIR="'/tmp/x'"`.
    accelerator_type: the slice's type; None when unknown.

  Returns:
    One line per local path (none on a single-host slice).
  """
  workers = num_workers(accelerator_type) if accelerator_type else None
  if workers == 1:
    return []
  bindings = []
  args = list(command)
  for i, arg in enumerate(args):
    if arg.startswith('--gin.'):
      bindings.append(arg[len('--gin.'):])
    elif arg.startswith('--gin_bindings='):
      bindings.append(arg[len('--gin_bindings='):])
    elif arg == '--gin_bindings' and i + 1 < len(args):
      bindings.append(args[i + 1])
  warnings = []
  for binding in bindings:
    name, sep, value = binding.partition('=')
    name = name.strip()
    if not sep or name not in PATH_MACROS:
      continue
    try:
      path = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      path = value.strip()
    if not isinstance(path, str) or path.startswith('gs://'):
      continue
    where, hint = f'the {workers} workers of a {accelerator_type}', ''
    if not workers:
      where = 'the workers of a multi-host slice'
      hint = ' (--accelerator-type tells whether this slice has one host)'
    warnings.append(f'warning: {name}={path!r} is not a gs:// path: {where} share no disk, so '
                    f'each would read and write its own local copy; use gs://BUCKET/...{hint}')
  return warnings
