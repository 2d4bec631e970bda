"""gin files as text: where a named file is, and the macros a file defines.

Read without gin and without importing what a file imports, so that `--help` can describe the
run files in a fraction of a second, and so that the command lines hand gin files it opens at
once: for a relative name gin itself tries each search path in turn, and its package-resource
reader logs an error for every one that does not hold the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

DEFAULT_SEARCH_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'gin')

# `NAME = value` at the start of a line: a macro (an upper-case name, no dot), maybe scoped.
_MACRO = re.compile(r'^((?:\w+/)*[A-Z][A-Z0-9_]*)\s*=\s*(.*)$')
_COMMENT = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|\s*#\s?(.*)$""")
_INCLUDE = re.compile(r"""^include\s+(['"])(.+)\1""")
REQUIRED = '%gin.REQUIRED'


@dataclasses.dataclass(frozen=True)
class Macro:
  """A macro a gin file defines.

  Attributes:
    name: e.g. 'BATCH_SIZE'.
    value: its value as written, e.g. '32' or '%gin.REQUIRED'.
    doc: the comment on the lines just above it and after it on its line, or ''.
  """

  name: str
  value: str
  doc: str = ''

  @property
  def required(self) -> bool:
    """Whether a run must bind it (`%gin.REQUIRED`)."""
    return self.value == REQUIRED


def search_path(search_paths: Sequence[str] = ()) -> list[str]:
  """The directories searched for gin files, in order: `search_paths`, then the repository's
  `gin/` (after the current directory, which comes first for a relative name)."""
  return list(search_paths) + [DEFAULT_SEARCH_PATH]


def find(name: str, search_paths: Sequence[str] = ()) -> str | None:
  """The absolute path of gin file `name` as gin would find it, or None where it is not a file.

  Args:
    name: an absolute path, or a path relative to the current directory or to a search path.
    search_paths: directories searched after the current directory, before `gin/`.
  """
  candidates = [name] if os.path.isabs(name) else [name] + [
      os.path.join(directory, name) for directory in search_path(search_paths)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def macro_name(line: str) -> str | None:
  """The macro a line of gin defines (`NAME = value`, NAME upper case), or None."""
  match = _MACRO.match(line.strip())
  return match.group(1) if match else None


def _split_comment(line: str) -> tuple[str, str]:
  """(code, comment) of one line; a '#' inside a quoted string is code."""
  for match in _COMMENT.finditer(line):
    if match.group(1) is None:
      return line[:match.start()].rstrip(), match.group(2).strip()
  return line.rstrip(), ''


def macros(path: str) -> list[Macro]:
  """The macros file `path` defines itself (not through includes), in order."""
  found, comments = [], []
  for line in open(path, encoding='utf-8').read().splitlines():
    code, comment = _split_comment(line)
    if not code:
      comments = comments + [comment] if line.strip() else []
      continue
    match = _MACRO.match(code)
    if match:
      doc = ' '.join(comments + ([comment] if comment else []))
      found.append(Macro(match.group(1), match.group(2).strip(), doc))
    comments = []
  return found


def includes(path: str) -> list[str]:
  """The files file `path` includes (`include '...'`), as written."""
  names = []
  for line in open(path, encoding='utf-8').read().splitlines():
    match = _INCLUDE.match(_split_comment(line)[0])
    if match:
      names.append(match.group(2))
  return names


def summary(path: str) -> str:
  """The first sentence of the comment at the top of file `path` ('' without one).

  It ends at the first '.', ':' or ';' followed by a space (or the end); an indented comment
  line (an example command) ends it too.
  """
  words = []
  for line in open(path, encoding='utf-8').read().splitlines():
    if not line.startswith('#') or line.startswith('#  '):
      break
    words.append(line[1:].strip())
  text = ' '.join(words)
  match = re.search(r'[.:;](\s|$)', text)
  return text[:match.start()] if match else text
