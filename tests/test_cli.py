"""gin stays at the edges: the library is plain Python, the command lines configure it."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import gin
import pytest

from calm_jax.cli import gin_cli

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / 'calm_jax'


def _imports(path: pathlib.Path) -> set[str]:
  """Top-level package names a module imports, anywhere in it (functions included)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split('.')[0])
      if node.module == 'calm_jax' and any(a.name == 'cli' for a in node.names):
        names.add('calm_jax.cli')
      if node.module.startswith('calm_jax.cli'):
        names.add('calm_jax.cli')
  return names


def _library_modules() -> list[pathlib.Path]:
  """Every module of calm_jax but the command lines (cli/, `python -m` programs)."""
  return sorted(p for p in LIBRARY.rglob('*.py')
                if 'cli' not in p.relative_to(LIBRARY).parts and p.name != '__main__.py')


def test_no_library_module_imports_gin_or_the_command_lines():
  modules = _library_modules()
  assert len(modules) > 20  # The scan sees the library.
  offenders = {str(p.relative_to(LIBRARY)): sorted(_imports(p) & {'gin', 'calm_jax.cli'})
               for p in modules}
  assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_scan_sees_a_gin_import(tmp_path):
  """Control: the scan above flags gin imported inside a function, and the command lines."""
  module = tmp_path / 'm.py'
  module.write_text('def f():\n  import gin.config\n  from calm_jax.cli import gin_cli\n')
  assert {'gin', 'calm_jax.cli'} <= _imports(module)


def _flags_defined_on_import(path: pathlib.Path) -> list[str]:
  """absl flags a module defines when imported (outside any function)."""
  found = []

  def visit(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      return
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('DEFINE_')):
      found.append(node.func.attr)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(ast.parse(path.read_text()))
  return found


def test_no_module_defines_flags_on_import():
  every = sorted(LIBRARY.rglob('*.py'))
  defining = {str(p.relative_to(LIBRARY)): _flags_defined_on_import(p) for p in every}
  assert {k: v for k, v in defining.items() if v} == {}
  control = '_X = flags.DEFINE_string("x", None, "")\ndef main():\n  flags.DEFINE_bool("y", 0, "")\n'
  assert _flags_defined_on_import_text(control) == ['DEFINE_string']


def _flags_defined_on_import_text(text: str) -> list[str]:
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
    f.write(text)
  try:
    return _flags_defined_on_import(pathlib.Path(f.name))
  finally:
    os.unlink(f.name)


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
  script = tmp_path / 'user_program.py'
  script.write_text(textwrap.dedent(code))
  env = {**os.environ, 'PYTHONPATH': str(LIBRARY.parent)}
  return subprocess.run([sys.executable, str(script), '--gin_file=mine.gin'],
                        capture_output=True, text=True, timeout=600, env=env, check=False)


def test_a_user_program_with_its_own_gin_file_flag_imports_everything(tmp_path):
  """A program that defines `--gin_file` itself imports every module of calm_jax."""
  result = _run('''
      import importlib, pkgutil, sys
      from absl import app, flags
      GIN_FILE = flags.DEFINE_string('gin_file', None, "the user's own flag")
      import calm_jax
      names = [m.name for m in pkgutil.walk_packages(calm_jax.__path__, 'calm_jax.')
               if not m.name.endswith('__main__')]
      for name in names:
        importlib.import_module(name)
      import calm_jax.train  # pylint: disable=unused-import

      def main(argv):
        del argv
        print('imported', len(names), 'modules; gin_file =', GIN_FILE.value)

      app.run(main)
      ''', tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'gin_file = mine.gin' in result.stdout
  assert int(result.stdout.split()[1]) > 25


def test_train_from_python_without_gin(tmp_path):
  """`train(...)` is a plain function: a notebook calls it, gin is never imported."""
  result = _run(f'''
      import functools, sys
      from calm_jax import optim, train
      from calm_jax.configs import TransformerConfig
      from calm_tasks import kv_arithmetic
      vocab = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).vocab_size
      metrics = train.train(
          model_dir={str(tmp_path / 'run')!r}, mode='pretrain',
          mixture_or_task_name='numeric_arithmetic',
          task_feature_lengths={{'inputs': 6, 'targets': 6}}, train_steps=2, batch_size=4,
          model_config=TransformerConfig(vocab_size=vocab, embed_dim=16, num_layers=1,
                                         num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32),
          optimizer_fn=functools.partial(optim.make_optimizer, learning_rate=1e-3),
          log_every=1, log=lambda _: None)
      print('loss', metrics['loss'], 'gin imported:', 'gin' in sys.modules)
      ''', tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'gin imported: False' in result.stdout
  assert (tmp_path / 'run' / 'lm' / 'config.json').exists()
  record = (tmp_path / 'run' / 'config.gin').read_text()
  assert "# mixture_or_task_name = 'numeric_arithmetic'" in record


def test_unset_required_arguments_are_named_before_the_call():
  def run(*, model_dir, steps, save_every=5):
    raise AssertionError('must not be called')

  gin.clear_config()
  try:
    gin_cli.configurable(run)
    gin.parse_config(['MODEL_DIR = %gin.REQUIRED', 'run.model_dir = %MODEL_DIR'])
    assert gin_cli.unset_required(run) == ['model_dir', 'steps']
    with pytest.raises(gin_cli.GinConfigError, match=r'run: required .*model_dir, steps'):
      gin_cli.call_with_gin(run)
    gin.parse_config(["MODEL_DIR = '/tmp/x'", "run.steps = {'a': %gin.REQUIRED}"])
    assert gin_cli.unset_required(run) == ['steps']  # REQUIRED inside a dict counts too.
  finally:
    gin.clear_config()
