"""Checkpoint integrity: a manifest of every file's size and SHA-256, verified before a restore.

orbax checksums neither the data files nor the metadata it writes, so flipped bytes restore
as garbage and a truncated file fails deep inside tensorstore. Every checkpoint this project
writes therefore carries a manifest of its files, written after them, and every restore checks
it first:

  LM checkpoint        `config.json["files"]`   covers `params/`
  composed checkpoint  `calm.json["files"]`     covers `params/` and `vocabulary/`
  run checkpoint       `checkpoints/<step>/manifest.json` covers the step's other files

A manifest maps each file's path, relative to the checkpoint directory, to its size and
SHA-256. Works on local and `gs://` paths (etils.epath).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Mapping, Sequence

from etils import epath

MANIFEST_FILE = 'manifest.json'
FORMAT = 'calm_jax.manifest/1'
_CHUNK = 8 << 20


def _files(directory: epath.Path) -> Iterator[epath.Path]:
  for child in sorted(directory.iterdir(), key=lambda p: p.name):
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


def file_digest(path: epath.Path) -> str:
  """SHA-256 of a file's bytes, read in chunks."""
  digest = hashlib.sha256()
  with path.open('rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def manifest(root: str | epath.Path, parts: Sequence[str] | None = None,
             exclude: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
  """{relative path: {'size', 'sha256'}} of the files under `root`.

  Args:
    root: the checkpoint directory.
    parts: the sub-directories or files of `root` to cover (default: all of it); missing
      ones are skipped.
    exclude: top-level names of `root` left out (the manifest file itself).
  """
  root = epath.Path(root)
  names = parts if parts is not None else sorted(p.name for p in root.iterdir())
  entries = {}
  for name in names:
    if name in exclude or not (root / name).exists():
      continue
    top = root / name
    for file in (_files(top) if top.is_dir() else [top]):
      relative = str(file.relative_to(root))
      entries[relative] = {'size': file.stat().length, 'sha256': file_digest(file)}
  return entries


def problems(root: str | epath.Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """What does not match the manifest `files` under `root` (empty: intact).

  Each problem names one file: missing, of another size (truncated) or of other contents.
  Files under `root` that the manifest does not list are not checked.
  """
  root = epath.Path(root)
  found = []
  for relative, expected in sorted(files.items()):
    file = root / relative
    if not file.exists():
      found.append(f'{relative} is missing')
      continue
    size = file.stat().length
    if size != expected['size']:
      found.append(f'{relative} has {size} bytes, {expected["size"]} were written')
    elif file_digest(file) != expected['sha256']:
      found.append(f'{relative} has changed since it was written (SHA-256 differs)')
  return found


def summary(found: Sequence[str]) -> str:
  """The first of `problems`' findings, and how many more there are."""
  return found[0] + (f' (and {len(found) - 1} more)' if len(found) > 1 else '')


def write_manifest(root: str | epath.Path) -> None:
  """Writes `root/manifest.json` covering every other file under `root` (written last)."""
  root = epath.Path(root)
  document = {'format': FORMAT, 'files': manifest(root, exclude=(MANIFEST_FILE,))}
  tmp = root / (MANIFEST_FILE + '.tmp')
  tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
  tmp.replace(root / MANIFEST_FILE)


def read_manifest(root: str | epath.Path) -> dict[str, dict[str, Any]] | None:
  """The files of `root/manifest.json`, or None where it is absent or unreadable."""
  file = epath.Path(root) / MANIFEST_FILE
  if not file.exists():
    return None
  try:
    document = json.loads(file.read_text())
  except json.JSONDecodeError:
    return None
  if document.get('format') != FORMAT or not isinstance(document.get('files'), dict):
    return None
  return document['files']


def verify_manifest(root: str | epath.Path) -> list[str]:
  """Problems of the directory `root` against its `manifest.json` (empty: intact)."""
  files = read_manifest(root)
  if files is None:
    return [f'{MANIFEST_FILE} is missing or unreadable (the save did not finish)']
  return problems(root, files)
