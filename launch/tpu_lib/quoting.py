"""Shell quoting for the printed commands and the remote lines, readable for gin flags."""

from __future__ import annotations

import re
from typing import Optional, Sequence

SAFE = re.compile(r'[\w@%+=:,./-]+', re.ASCII)  # Words no POSIX shell changes (as shlex).
_FLAG_PREFIX = re.compile(r'(--?[A-Za-z0-9_][A-Za-z0-9_.-]*=)(.*)', re.DOTALL)
# bash and zsh expand `!` inside double quotes unless a blank, `=` or `(` follows it.
_HISTORY = re.compile(r'!(?![ \t\n=(])')


def _quote_mode(text: str, i: int) -> Optional[str]:
  """The quotes text[i] needs: `'` only double quotes, `$`, backquote and `!` single ones."""
  char = text[i]
  if char == "'":
    return '"'
  if char in '$`' or (char == '!' and _HISTORY.match(text, i)):
    return "'"
  return None


def quote_value(value: str) -> str:
  """Quotes a string in runs of single and double quotes, cut at blanks where possible.

  Args:
    value: any string; unlike shell_quote, a `--flag=` prefix gets no special treatment.

  Returns:
    `value` itself when no shell would change it, else a quoted word that reads back as it.
  """
  if SAFE.fullmatch(value):
    return value
  runs = []
  mode, start, last_constrained = None, 0, -1
  for i in range(len(value)):
    need = _quote_mode(value, i)
    if need is None:
      continue
    if mode is not None and need != mode:
      blank = value.rfind(' ', last_constrained + 1, i)
      cut = blank + 1 if blank >= 0 else i
      runs.append((mode, value[start:cut]))
      start = cut
    mode, last_constrained = need, i
  runs.append((mode or "'", value[start:]))
  # Inside double quotes only `\`, `"`, `$` and backquote are special, and runs in double
  # quotes hold no `$` or backquote: shells and shlex.split read them alike.
  return ''.join(f"'{text}'" if quote == "'" else '"' + re.sub(r'([\\"])', r'\\\1', text) + '"'
                 for quote, text in runs)


def shell_quote(word: str) -> str:
  """Quotes one word for a POSIX shell, keeping it readable.

  Like shlex.quote, but `--flag=value` keeps its `--flag=` outside the quotes and single quotes
  go inside double quotes: `--gin.MODEL_DIR="'gs://b/run'"` stays as people write it instead of
  becoming `'--gin.MODEL_DIR='"'"'gs://b/run'"'"''`. Double-quoted runs hold no `$`, backquote
  or `!`, so a shell (bash, zsh, sh) and shlex.split read the result alike.

  Args:
    word: any string.

  Returns:
    A string that a POSIX shell and shlex.split read back as `word`.
  """
  match = _FLAG_PREFIX.fullmatch(word)
  if match:
    return match.group(1) + shell_quote(match.group(2)) if match.group(2) else word + "''"
  return quote_value(word) if word else "''"


def shell_join(argv: Sequence[str]) -> str:
  """Quotes and joins a command line (see shell_quote).

  Args:
    argv: the words.

  Returns:
    One line that a POSIX shell splits back into `argv`.
  """
  return ' '.join(shell_quote(word) for word in argv)
