"""`--help` of the console scripts: what a command does, its run files' macros, its flags and
an example, printed before anything heavy is imported.

absl's own `--help` prints the main module's docstring and exits 1, after the program has
imported everything (JAX, TensorFlow, SeqIO: seconds). Each command's `main` calls
`exit_on_help` first and imports the library only when it returns.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Any, Callable, Mapping, Sequence

from absl import flags

from calm_jax.cli import gin_files

SHORT_HELP = ('-h', '-?', '-help', '--help', '-helpshort', '--helpshort')
FULL_HELP = ('-helpfull', '--helpfull')

GIN_USAGE = """\
gin: --gin_file=FILE (repeatable) parses FILE, found as given or under --gin_search_paths and
gin/ (includes too); --gin.NAME=VALUE binds NAME, a macro or `configurable.param`, like a line
of gin after the files. Values are gin (Python) literals: a string needs quotes that survive
the shell, --gin.MODEL_DIR="'/tmp/run'". A macro no parsed file uses (a misspelt name) and a
%gin.REQUIRED macro left unbound are errors."""


@dataclasses.dataclass(frozen=True)
class Command:
  """What `--help` says about one console script.

  Attributes:
    name: the console script, e.g. 'calm-train'.
    module: its `python -m` module, e.g. 'calm_jax.cli.train'.
    summary: what the command does, a paragraph.
    run_files: gin files (relative to gin/) whose macros the help lists, e.g. 'runs/eval.gin'.
    example: a command line that runs as it stands (after the ones it names).
  """

  name: str
  module: str
  summary: str
  run_files: Sequence[str] = ()
  example: str = ''


def help_requested(argv: Sequence[str]) -> str | None:
  """'short' or 'full' where `argv` (program name first) asks for help, else None."""
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg in SHORT_HELP:
      return 'short'
    if arg in FULL_HELP:
      return 'full'
  return None


def _indent(text: str, width: int = 2) -> str:
  return textwrap.indent(text, ' ' * width)


def describe_run_file(name: str, search_paths: Sequence[str] = ()) -> str:
  """The summary line and macros (required or default, with their comments) of a gin file."""
  path = gin_files.find(name, search_paths)
  if path is None:
    return f'{name}: not found under {gin_files.search_path(search_paths)}'
  lines = [textwrap.fill(f'{name}: {gin_files.summary(path)}'.rstrip(': '), width=94,
                         subsequent_indent='    ')]
  defined = gin_files.macros(path)
  width = max((len(m.name) for m in defined), default=0)
  for macro in defined:
    value = 'REQUIRED' if macro.required else f'default {macro.value}'
    doc = f'  ({macro.doc})' if macro.doc else ''
    lines.append(textwrap.fill(f'  {macro.name.ljust(width)}  {value}{doc}', width=94,
                               subsequent_indent=' ' * (width + 6)))
  for included in gin_files.includes(path):
    lines.append(f'  (includes {included}, with its macros)')
  if not defined and not gin_files.includes(path):
    lines.append('  (no macros)')
  return '\n'.join(lines)


def format_help(command: Command, flags_text: str) -> str:
  """The whole `--help` text of `command`; `flags_text` lists its flags."""
  parts = [textwrap.fill(f'{command.name} (python -m {command.module}): {command.summary}',
                         width=96)]
  if command.run_files:
    parts.append(GIN_USAGE)
    parts.append('Run files and their macros (bind with --gin.NAME=VALUE):\n' + _indent(
        '\n'.join(describe_run_file(name) for name in command.run_files)))
  parts.append('Flags:\n' + flags_text.rstrip())
  if command.example:
    parts.append('Example:\n' + _indent(command.example.strip()))
  return '\n\n'.join(parts) + '\n'


def _flags_text(holders: Mapping[str, Any], full: bool) -> str:
  """absl's help of the flags in `holders` (without its module line), or of every flag."""
  if full:
    return _indent(flags.FLAGS.get_help())
  first = next(iter(holders.values())).name
  text = flags.FLAGS.module_help(flags.FLAGS.find_module_defining_flag(first))
  return '\n'.join(line for line in text.splitlines() if line.startswith(' '))


def exit_on_help(command: Command, define_flags: Callable[[], Mapping[str, Any]],
                 argv: Sequence[str] | None = None) -> None:
  """Prints the help of `command` and exits 0 where `argv` asks for it; else returns.

  Args:
    command: what to say.
    define_flags: defines the command's flags (as its `main` would) and returns their holders
      by name; called only to print them.
    argv: the command line, default `sys.argv`.
  """
  kind = help_requested(sys.argv if argv is None else argv)
  if kind is None:
    return
  holders = define_flags()
  sys.stdout.write(format_help(command, _flags_text(holders, full=kind == 'full')))
  sys.stdout.flush()
  sys.exit(0)
