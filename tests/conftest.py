"""Shared fixtures of the calm_jax tests."""

import pathlib

import pytest


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  """The repository's top directory."""
  return pathlib.Path(__file__).resolve().parent.parent
