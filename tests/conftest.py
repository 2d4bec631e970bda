"""Shared fixtures of the calm_jax tests."""

import json
import os
import pathlib
import subprocess
import sys

# Tests compile many small programs once each: XLA's cheapest backend optimisation level halves
# the suite's time on a CPU. Benchmarks run in their own processes without it.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_backend_optimization_level=0').strip()
# The tests run on CPU devices. With libtpu installed (test extra) JAX would first try, and fail,
# to start a TPU backend in every process; launch/aot_compile.py uses libtpu as a compiler only.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  """The repository's top directory."""
  return pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def run_benchmark(repo_root, tmp_path):
  """`run_benchmark(name, *flags)`: runs benchmarks/<name>.py as a user would; returns its JSON.

  The benchmark gets XLA's default flags (not the tests' cheap optimisation level) and writes
  its report to a temporary file.
  """
  def run(name: str, *flags: str) -> dict:
    output = tmp_path / f'{name}.json'
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env['PYTHONPATH'] = str(repo_root)
    result = subprocess.run(
        [sys.executable, str(repo_root / 'benchmarks' / f'{name}.py'), *flags,
         f'--output={output}'], capture_output=True, text=True, timeout=600, env=env,
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())
  return run


@pytest.fixture(scope='session')
def gemma_anchor(tmp_path_factory) -> str:
  """An LM checkpoint converted from the gemma3 GGUF fixture as `calm-convert` converts the real
  Gemma 3 270M (its SentencePiece vocabulary included; BOS 2)."""
  import gguf_fixtures as fx  # pylint: disable=g-import-not-at-top
  from calm_jax.convert import gguf_file  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('gemma_anchor')
  path = fx.write_gguf(root / 'gemma3.gguf', 'gemma3')
  gguf_file.convert_gguf_file(str(path), str(root / 'lm'), log=lambda *a: None)
  return str(root / 'lm')
