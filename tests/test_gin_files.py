"""Every gin file parses; model and bridge files build exactly their Python presets."""

import pathlib

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


def test_model_files_are_the_presets(repo_root):
  """One gin/models file per preset, named after it."""
  files = {p.stem for p in (repo_root / GIN_ROOT / 'models').glob('*.gin')}
  assert files == set(presets.PRESETS)


@pytest.mark.parametrize('name', sorted(presets.PRESETS))
def test_model_files(name, repo_root):
  """models/<name>.gin parses and its MODEL_CONFIG is the preset function `name`'s config."""
  path = repo_root / GIN_ROOT / 'models' / f'{name}.gin'
  assert _macro(path, 'MODEL_CONFIG') == presets.PRESETS[name]()


def test_model_file_field_override(repo_root):
  """The override each model file documents: a binding after the file, as a flag would be."""
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(repo_root / GIN_ROOT / 'models' / 'gemma2_2b.gin')],
        ["presets.get_preset.dtype = 'float32'"], finalize_config=False)
    config = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert config == presets.get_preset('gemma2_2b', dtype='float32')
  assert config.dtype == 'float32' and presets.gemma2_2b().dtype == 'bfloat16'


def _all_gin_files():
  root = pathlib.Path(__file__).resolve().parent.parent / GIN_ROOT
  return sorted(str(p.relative_to(root)) for p in root.rglob('*.gin'))


@pytest.mark.parametrize('name', _all_gin_files())
def test_every_gin_file_parses_and_binds(name, repo_root):
  """Parsing validates every binding against its configurable's signature."""
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(repo_root / GIN_ROOT))
    gin.parse_config_file(str(repo_root / GIN_ROOT / name))
    assert gin.config_str() or name.startswith('tasks/')
  finally:
    gin.clear_config()
