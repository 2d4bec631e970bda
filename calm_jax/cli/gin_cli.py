"""T5X-style command lines: gin applied to the library's plain functions.

The library (`calm_jax.train.train`, `calm_jax.eval.evaluate`, ...) never imports gin; the
command-line modules beside this one define their flags when they start and configure those
functions here, as T5X's `train.py` does with `gin.configurable(train)` in `__main__`.

  calm-train --gin_file=runs/compose.gin --gin_search_paths=gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=1000

`--gin_file` (repeatable) names gin files, found directly or under `--gin_search_paths`;
`--gin.NAME=VALUE` binds NAME (a macro or `configurable.param`) like a line of gin;
`--gin_bindings` takes whole binding lines. Multi-host runs add `--multiprocess` (Cloud TPU) or
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. A file that does not parse,
a binding that does not parse (named, with the quoted form of a string), a macro binding that no
parsed file uses (with the closest macro they do use), an unknown configurable, a
`%gin.REQUIRED` macro left unset, an unknown task, a bad model configuration and a missing or
mismatched checkpoint each stop the run with one message (ValueError and its subclasses; other
errors keep their traceback).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import io
import os
import re
import sys
import tokenize
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import gin

from calm_jax import logs
from calm_jax.cli import gin_files
from calm_jax.cli import usage


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


def _as_flag(binding: str) -> str:
  """`NAME = VALUE` as the flag that makes it, `--gin.NAME=VALUE`."""
  name, _, value = binding.partition('=')
  return f'--gin.{name.strip()}={value.strip()}'


def _binding_at(bindings: Sequence[str], line: int) -> str | None:
  """The binding on line `line` (from 1) of the bindings joined by newlines, as gin parses them."""
  start = 1
  for binding in bindings:
    lines = binding.count('\n') + 1
    if start <= line < start + lines:
      return binding
    start += lines
  return None


def _tokenizes(text: str) -> bool:
  """Whether `text` is complete Python tokens (brackets and strings closed), as gin reads it."""
  try:
    list(tokenize.generate_tokens(io.StringIO(text).readline))
  except (tokenize.TokenError, SyntaxError):
    return False
  return True


def _binding_error(bindings: Sequence[str], error: Exception) -> str:
  """The message of a binding gin cannot parse: the binding, and the quoted form of a string."""
  binding = None
  if isinstance(error, SyntaxError) and error.lineno:
    binding = _binding_at(bindings, error.lineno)
  elif isinstance(error, tokenize.TokenError):  # An unclosed bracket: gin reports the end.
    binding = next((b for b in bindings if not _tokenizes(b)), None)
  if binding is None:
    return f'Malformed gin configuration: {error}'
  value = binding.partition('=')[2].strip()
  message = f'Malformed gin binding {_as_flag(binding)}: gin cannot parse the value {value}'
  # A bare word or path (the shell ate its quotes) is the usual cause: gin values are literals.
  if value and re.fullmatch(r'[^\'"\[\]{}()@%,=]+', value):
    name = binding.partition('=')[0].strip()
    return (f'{message}. A string needs quotes that reach gin through the shell: '
            f'--gin.{name}="\'{value}\'"')
  reason = error.msg if isinstance(error, SyntaxError) else error.args[0]
  return f'{message} ({reason}).'


def _macro_names() -> tuple[set[str], set[str]]:
  """(defined, referenced): the macros the parsed configuration defines and uses (`%NAME`)."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  defined = {scope for scope, selector in config if selector == 'gin.macro'}
  referenced = {reference.scoped_selector.rpartition('/')[0]
                for reference in gin.config.iterate_references(config)
                if reference.configurable.wrapped is gin.config.macro}
  return defined, referenced


def check_macro_bindings(bindings: Sequence[str]) -> None:
  """Refuses bindings of macros (`NAME = value`, NAME upper case) that nothing parsed uses.

  Such a binding changes nothing, silently: a misspelt `--gin.BATCH_SIZ=8` leaves the run at
  its default batch size. Call after the files and `bindings` are parsed.

  Raises:
    GinConfigError: naming each such binding and the closest macro the configuration has.
  """
  defined, referenced = _macro_names()
  unused = [(name, binding) for binding in bindings
            if (name := gin_files.macro_name(binding.split('\n')[0])) and name not in referenced]
  if not unused:
    return
  known = sorted((defined | referenced) - {name for name, _ in unused})
  problems = []
  for name, binding in unused:
    close = difflib.get_close_matches(name, known, n=1)
    hint = (f'did you mean {close[0]}?' if close else
            f'the parsed files use {", ".join(known) if known else "no macros"}.')
    problems.append(f'{_as_flag(binding)} binds a macro no parsed gin file uses (%{name}), so it '
                    f'would change nothing; {hint}')
  raise GinConfigError(' '.join(problems))


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files, then bindings, with clear errors.

  Each file is found here (as given, then under `search_paths`, then gin/) and given to gin by
  its absolute path, so gin opens it at once; gin finds included files in the same order.

  Raises:
    GinConfigError: a missing file, a file or binding that does not parse (the binding named),
      an unknown configurable, a macro binding that nothing parsed uses.
  """
  directories = gin_files.search_path(search_paths)
  for path in directories:
    gin.add_config_file_search_path(path)
  found = [gin_files.find(name, search_paths) or name for name in files]
  try:
    gin.parse_config_files_and_bindings(found, None, finalize_config=False)
  except IOError as e:
    raise GinConfigError(f'gin file not found: {e} (search paths: {directories}).') from e
  except (SyntaxError, ValueError, tokenize.TokenError) as e:
    raise GinConfigError(f'Malformed gin configuration: {e}') from e
  try:
    gin.parse_config(list(bindings))
  except IOError as e:
    raise GinConfigError(f'gin file not found: {e} (search paths: {directories}).') from e
  except (SyntaxError, ValueError, tokenize.TokenError) as e:
    raise GinConfigError(_binding_error(bindings, e)) from e
  check_macro_bindings(bindings)


def configurable(fn: Callable[..., Any], denylist: Sequence[str] = ()) -> Callable[..., Any]:
  """The gin-configured version of the plain function `fn`, registering it if needed.

  Gin files bind it by its module (`from calm_jax import train as train_lib`, then
  `train_lib.train.model_dir = ...`), or by its short name (`train.model_dir`).
  """
  if gin.config._inverse_lookup(fn) is None:  # pylint: disable=protected-access
    gin.configurable(fn, denylist=list(denylist))
  return gin.get_configurable(fn)


_VALUES = (gin.config.macro, gin.config._retrieve_constant)  # pylint: disable=protected-access


def _is_required(value: Any) -> bool:
  """Whether a bound value is, or holds (in a dict, list or tuple), `%gin.REQUIRED`."""
  if isinstance(value, gin.config.ConfigurableReference):
    # Macros and constants (`%NAME`, `%gin.REQUIRED`) are values; a configurable's own
    # REQUIRED arguments are gin's to report when it is called.
    if not (value.evaluate and value.configurable.wrapped in _VALUES):
      return False
    value = value.scoped_configurable_fn()
  if isinstance(value, dict):
    return any(_is_required(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return any(_is_required(v) for v in value)
  return value is gin.REQUIRED


def unset_required(fn: Callable[..., Any]) -> list[str]:
  """Keyword arguments of `fn` that gin leaves unset: no default and no binding, or bound to
  `%gin.REQUIRED` (through a macro such as `MODEL_DIR = %gin.REQUIRED`, also inside a dict)."""
  info = gin.config._inverse_lookup(fn)  # pylint: disable=protected-access
  selector = info.selector if info is not None else fn.__name__
  missing = []
  for parameter in inspect.signature(fn).parameters.values():
    if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
      continue
    try:
      value = gin.query_parameter(f'{selector}.{parameter.name}')
    except ValueError:  # Not bound: the default, if any.
      value = parameter.default
    if value is inspect.Parameter.empty or _is_required(value):
      missing.append(parameter.name)
  return sorted(missing)


def call_with_gin(fn: Callable[..., Any], **overrides: Any) -> Any:
  """Calls plain `fn` with its gin bindings (and `overrides`), with one message for what a run
  must set and did not.

  Raises:
    GinConfigError: a required argument of `fn` is unset, or a `%gin.REQUIRED` value below it.
  """
  configured = configurable(fn)
  missing = [name for name in unset_required(fn) if name not in overrides]
  if missing:
    raise GinConfigError(
        f'{fn.__name__}: required gin value(s) unset: {", ".join(missing)} (bind the macro, '
        f'e.g. --gin.{missing[0].upper()}=..., or {fn.__name__}.{missing[0]} = ...).')
  try:
    return configured(**overrides)
  except RuntimeError as e:
    if 'Required bindings' in str(e) or 'REQUIRED' in str(e):
      raise GinConfigError(f'A required gin value is unset: {e}') from e
    raise


def define_flags() -> dict[str, Any]:
  """The flags of every gin command line, defined once per program (not on import).

  Returns:
    Their flag holders by name.
  """
  if 'gin_file' in flags.FLAGS:
    raise app.UsageError('gin command-line flags are already defined in this program.')
  return {
      'gin_file': flags.DEFINE_multi_string('gin_file', [], 'gin files to parse, in order.'),
      'gin_bindings': flags.DEFINE_multi_string('gin_bindings', [], 'Extra gin binding lines.'),
      'gin_search_paths': flags.DEFINE_list(
          'gin_search_paths', [], 'Directories searched for --gin_file and gin includes.'),
      # Multi-host (T5X's flag names). On Cloud TPU `--multiprocess` alone is enough: JAX
      # finds the coordinator and the process ids itself.
      'multiprocess': flags.DEFINE_bool(
          'multiprocess', False, 'Call jax.distributed.initialize() before the run (multi-host).'),
      'coordinator_address': flags.DEFINE_string(
          'coordinator_address', None, 'host:port of process 0 (implies --multiprocess).'),
      'num_processes': flags.DEFINE_integer('num_processes', None, 'Number of processes.'),
      'process_id': flags.DEFINE_integer('process_id', None, 'This process\'s index.'),
  }


def one_line(error: BaseException) -> str:
  """The message of `error` without the lines gin appends to errors raised under a
  configurable ("In call to configurable 'train' ...")."""
  return str(error).split('\n  In call to configurable')[0]


def gin_main(fn: Callable[..., Any], *, denylist: Sequence[str] = ()) -> None:
  """Runs the plain function `fn`, configured by the command line's gin, as an absl program.

  Args:
    fn: a library function taking keyword arguments only. If it takes `config_text`, it gets
      the parsed configuration (`gin.config_str()`) to record in its output directory.
    denylist: arguments gin may not bind (e.g. a logging callback).
  """
  flag = define_flags()
  configurable(fn, denylist)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.setup_console_logging()
    if flag['multiprocess'].value or flag['coordinator_address'].value:
      import jax  # pylint: disable=g-import-not-at-top
      # Cross-process collectives of CPU devices (tests, laptops); TPUs do not use this.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=flag['coordinator_address'].value,
                                 num_processes=flag['num_processes'].value,
                                 process_id=flag['process_id'].value)
    try:
      parse_gin(flag['gin_file'].value, flag['gin_bindings'].value,
                flag['gin_search_paths'].value)
      overrides = {}
      if 'config_text' in inspect.signature(fn).parameters:
        overrides['config_text'] = gin.config_str()
      call_with_gin(fn, **overrides)
    # Bad configuration, task, checkpoint, or a diverged run: one message, no traceback.
    except (ValueError, FloatingPointError) as e:
      sys.exit(f'{os.path.basename(sys.argv[0])}: {type(e).__name__}: {one_line(e)}')
  app.run(_main, argv=rewrite_gin_args(sys.argv))


def command_main(command: usage.Command, target: str, *, denylist: Sequence[str] = ()) -> None:
  """The `main` of a gin command: `--help` answered before anything heavy is imported, then
  the plain function `target` ('module:function') imported and run by `gin_main`."""
  usage.exit_on_help(command, define_flags)
  logs.quiet_startup()
  module, _, name = target.partition(':')
  gin_main(getattr(importlib.import_module(module), name), denylist=denylist)
