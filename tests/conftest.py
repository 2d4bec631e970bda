"""Shared fixtures of the calm_jax tests."""

import os
import pathlib

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
