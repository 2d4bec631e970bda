"""T5X-style command lines for the gin entry points.

  calm-train --gin_file=runs/compose.gin --gin_search_paths=gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=1000

`--gin_file` (repeatable) names gin files, found directly or under `--gin_search_paths`;
`--gin.NAME=VALUE` binds NAME (a macro or `configurable.param`) like a line of gin;
`--gin_bindings` takes whole binding lines. Multi-host runs add `--multiprocess` (Cloud TPU) or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. A file that does not parse, an unknown
configurable, a `%gin.REQUIRED` macro left unset, an unknown task, a bad model configuration and
a missing or mismatched checkpoint each stop the run with one message (ValueError and its
subclasses; other errors keep their traceback).
"""

from __future__ import annotations

import os
import sys
import tokenize
from typing import Callable, Mapping, Sequence

from absl import app
from absl import flags
import gin

from calm_jax import logs

_GIN_FILE = flags.DEFINE_multi_string('gin_file', [], 'gin files to parse, in order.')
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Extra gin binding lines.')
_GIN_SEARCH_PATHS = flags.DEFINE_list(
    'gin_search_paths', [], 'Directories searched for --gin_file and gin includes.')

# Multi-host (T5X's flag names). On Cloud TPU `--multiprocess` alone is enough: JAX finds the
# coordinator and the process ids itself.
_MULTIPROCESS = flags.DEFINE_bool(
    'multiprocess', False, 'Call jax.distributed.initialize() before the run (multi-host).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (implies --multiprocess).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')

DEFAULT_SEARCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   'gin')


class GinConfigError(ValueError):
  """The gin configuration is malformed or incomplete."""


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns T5X's `--gin.NAME=VALUE` flags into `--gin_bindings=NAME=VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise app.UsageError(f'{arg}: expected --gin.NAME=VALUE.')
      out.append(f'--gin_bindings={name} = {value}')
    else:
      out.append(arg)
  return out


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files and bindings with clear errors.

  Raises:
    GinConfigError: a missing file, a parse error, an unknown configurable.
  """
  for path in list(search_paths) + [DEFAULT_SEARCH_PATH]:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
  except IOError as e:
    raise GinConfigError(f'gin file not found: {e} (search paths: '
                         f'{list(search_paths) + [DEFAULT_SEARCH_PATH]}).') from e
  except (SyntaxError, ValueError, tokenize.TokenError) as e:
    raise GinConfigError(f'Malformed gin configuration: {e}') from e


def check_required(function: str, values: Mapping[str, object]) -> None:
  """Raises GinConfigError naming every argument still `%gin.REQUIRED` (set through a macro)."""
  missing = sorted(k for k, v in values.items() if v is gin.REQUIRED)
  if missing:
    raise GinConfigError(
        f'{function}: required gin value(s) unset: {", ".join(missing)} (bind the macro, e.g. '
        f'--gin.{missing[0].upper()}=..., or {function}.{missing[0]} = ...).')


def call_with_gin(fn: Callable[[], object]) -> object:
  """Calls a gin-configured entry function, turning gin's REQUIRED errors into one message."""
  try:
    return fn()
  except RuntimeError as e:
    if 'Required bindings' in str(e) or 'REQUIRED' in str(e):
      raise GinConfigError(f'A required gin value is unset: {e}') from e
    raise


def gin_main(entry: Callable[[], object]) -> None:
  """Runs `entry` (a gin-configurable taking no arguments) as an absl program."""
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.setup_console_logging()
    if _MULTIPROCESS.value or _COORDINATOR.value:
      import jax  # pylint: disable=g-import-not-at-top
      # Cross-process collectives of CPU devices (tests, laptops); TPUs do not use this.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value)
    try:
      parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value, _GIN_SEARCH_PATHS.value)
      call_with_gin(entry)
    except ValueError as e:  # Bad configuration, task, checkpoint: one message, no traceback.
      sys.exit(f'{os.path.basename(sys.argv[0])}: {type(e).__name__}: {e}')
  app.run(_main, argv=rewrite_gin_args(sys.argv))
