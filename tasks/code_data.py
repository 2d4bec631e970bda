"""A real code corpus on every machine: the Python standard library of the running interpreter.

  modules()                 the non-test modules (name, path) of `sysconfig`'s stdlib directory
  held_out(name)            whether a module is held out: a fixed HELD_OUT_SHARE of the modules,
                            chosen by the SHA-256 of the module's name (deterministic, the same
                            on every machine with the same Python version)
  functions(module)         its functions with docstrings as CodeText pairs: the function's
                            source without its docstring -> the docstring's first sentence
                            (the CodeXGLUE code-to-text form, mined with `ast`)
  code_text(held_out)       every pair of the training (or held-out) modules
  source_chunks(held_out)   the training (or held-out) modules' source, in chunks of lines (the
                            code LM's text)
  Training text that occurs verbatim in a held-out module (cProfile copies profile's code)
  is dropped (`in_held_out_source`).
  docstrings(held_out)      the modules' docstrings' prose (English that ships with Python)

Excluded as tests or not Python-the-library: test packages and test_*.py files, idlelib,
tkinter, turtledemo, lib2to3, ensurepip, site-packages, __pycache__, and any file that does not
parse with this interpreter. The numbers in the README come from `python_version()`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import re
import sysconfig
import textwrap

from calm_tasks.code_formats import CodeText

HELD_OUT_SHARE = 0.1
EXCLUDED_PARTS = frozenset({'test', 'tests', 'idle_test', 'idlelib', 'tkinter', 'turtledemo',
                            'lib2to3', 'ensurepip', 'site-packages', 'dist-packages',
                            '__pycache__', '__phello__'})
_SENTENCE_END = re.compile(r'(?<=[.!?])\s')


def python_version() -> str:
  """The interpreter whose standard library is the corpus (e.g. '3.11.7')."""
  return platform.python_version()


@functools.lru_cache(maxsize=1)
def modules() -> tuple[tuple[str, str], ...]:
  """(dotted module name, file path) of every non-test stdlib module, sorted by name."""
  root = sysconfig.get_path('stdlib')
  found = []
  for directory, subdirs, files in os.walk(root):
    relative = os.path.relpath(directory, root)
    parts = [] if relative == '.' else relative.split(os.sep)
    if any(p in EXCLUDED_PARTS or p.startswith('test') for p in parts):
      subdirs[:] = []
      continue
    subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_PARTS)
    for name in sorted(files):
      if not name.endswith('.py') or name.startswith('test_') or name == 'test.py':
        continue
      stem = name[:-3]
      dotted = '.'.join(parts + ([] if stem == '__init__' else [stem]))
      if dotted:
        found.append((dotted, os.path.join(directory, name)))
  return tuple(sorted(found))


def held_out(name: str) -> bool:
  """Whether module `name` is held out (module docstring); a package's modules go with its
  top-level name, so that no held-out code is imported by a training module of its package."""
  top = name.split('.')[0]
  digest = hashlib.sha256(top.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < HELD_OUT_SHARE


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> tuple[str, ast.Module] | None:
  try:
    with open(path, encoding='utf-8') as f:
      source = f.read()
    return source, ast.parse(source)
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return None


def first_sentence(docstring: str) -> str:
  """The docstring's first sentence (up to its first blank line or sentence end), whitespace
  collapsed."""
  paragraph = docstring.strip().split('\n\n')[0]
  text = ' '.join(paragraph.split())
  return _SENTENCE_END.split(text, maxsplit=1)[0]


def functions(name: str, path: str) -> list[CodeText]:
  """The module's functions and methods with a docstring of at least three words, as
  (source without the docstring, its first sentence) pairs, in source order."""
  parsed = _parsed(path)
  if parsed is None:
    return []
  source, tree = parsed
  lines = source.splitlines()
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node, clean=True)
    first = node.body[0]
    if not doc or first.lineno <= node.lineno or len(node.body) < 2:
      continue  # No docstring, a docstring on the def line, or nothing but a docstring.
    summary = first_sentence(doc)
    if len(summary.split()) < 3:
      continue
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    kept = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
    code = textwrap.dedent('\n'.join(kept)).strip('\n')
    pairs.append(CodeText(code, summary, f'{name}:{node.lineno}'))
  return sorted(pairs, key=lambda p: int(p.source.rsplit(':', 1)[1]))


@functools.lru_cache(maxsize=1)
def _held_out_text() -> tuple[str, frozenset[str]]:
  """The held-out modules' sources joined, and the set of their stripped lines."""
  sources = [_parsed(p)[0] for n, p in modules() if held_out(n) and _parsed(p) is not None]
  return '\n\n'.join(sources), frozenset(l.strip() for s in sources for l in s.splitlines())


def in_held_out_source(text: str) -> bool:
  """Whether `text` occurs verbatim in a held-out module (a few modules of different names
  share code: cProfile copies profile's main): such training text is dropped."""
  joined, lines = _held_out_text()
  if not all(l.strip() in lines for l in text.splitlines()):
    return False  # Cheap test first: a line no held-out module has.
  return text in joined


@functools.lru_cache(maxsize=2)
def _code_text(held_out_modules: bool) -> tuple[CodeText, ...]:
  pairs = (pair for name, path in modules() if held_out(name) == held_out_modules
           for pair in functions(name, path))
  if held_out_modules:
    return tuple(pairs)
  targets = {p.text for p in _code_text(True)}
  return tuple(p for p in pairs if p.text not in targets and not in_held_out_source(p.code))


def code_text(held_out_modules: bool) -> list[CodeText]:
  """Every code->text pair of the training (False) or held-out (True) modules; a training pair
  whose summary is a held-out pair's too (generic sentences recur), or whose code occurs in a
  held-out module, is left out."""
  return list(_code_text(held_out_modules))


def source_chunks(held_out_modules: bool, lines_per_chunk: int = 24) -> list[str]:
  """The training (or held-out) modules' source in chunks of `lines_per_chunk` lines (blank
  chunks dropped; training chunks that occur in a held-out module too, `in_held_out_source`,
  dropped)."""
  chunks = []
  for name, path in modules():
    if held_out(name) != held_out_modules or _parsed(path) is None:
      continue
    lines = _parsed(path)[0].splitlines()
    for i in range(0, len(lines), lines_per_chunk):
      chunk = '\n'.join(lines[i:i + lines_per_chunk])
      if chunk.strip() and (held_out_modules or not in_held_out_source(chunk)):
        chunks.append(chunk)
  return chunks


def docstrings(held_out_modules: bool) -> list[str]:
  """The first paragraph of every module, class and function docstring of the training (or
  held-out) modules, whitespace collapsed (English prose). The training modules' omit every
  paragraph that contains a held-out function's summary (a few sentences recur across
  modules), so that no held-out target is read in training."""
  if not held_out_modules:
    targets = {p.text for p in code_text(True)}
    return [t for t in _docstrings(False) if not any(s in t for s in targets)]
  return _docstrings(True)


@functools.lru_cache(maxsize=2)
def _docstrings(held_out_modules: bool) -> list[str]:
  texts = []
  for name, path in modules():
    if held_out(name) != held_out_modules or _parsed(path) is None:
      continue
    for node in ast.walk(_parsed(path)[1]):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
          paragraph = ' '.join(doc.strip().split('\n\n')[0].split())
          if len(paragraph.split()) >= 3:
            texts.append(paragraph)
  return texts
