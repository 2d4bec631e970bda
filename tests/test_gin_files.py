"""Every gin file parses; model and bridge files build exactly their Python presets."""

import gin
import pytest

from calm_jax import configs, presets

GIN_ROOT = 'gin'


def _gin_files(repo_root):
  return sorted(str(p.relative_to(repo_root / GIN_ROOT))
                for p in (repo_root / GIN_ROOT).rglob('*.gin'))


def _macro(path, name):
  gin.clear_config()
  try:
    gin.parse_config_file(str(path))
    return gin.query_parameter(f'%{name}').scoped_configurable_fn()
  finally:
    gin.clear_config()


def test_there_are_gin_files(repo_root):
  files = _gin_files(repo_root)
  assert any(f.startswith('models/') for f in files)
  assert any(f.startswith('bridges/') for f in files)


@pytest.mark.parametrize('name', ['default', 'paper'])
def test_bridge_files(name, repo_root):
  expected = {'default': configs.BridgeConfig(), 'paper': configs.paper_bridge()}[name]
  assert _macro(repo_root / GIN_ROOT / 'bridges' / f'{name}.gin', 'BRIDGE') == expected


@pytest.mark.parametrize('name', sorted(presets.PRESETS))
def test_model_files(name, repo_root):
  path = repo_root / GIN_ROOT / 'models' / f'{name}.gin'
  assert _macro(path, 'MODEL_CONFIG') == presets.get_preset(name)
