"""`calm-convert` as users run it: a separate process, exit codes and messages."""

import json
import subprocess
import sys

import pytest

from calm_jax.convert import tiny_hf


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf') / 'qwen3'
  tiny_hf.save_model(tiny_hf.make_model('qwen3'), str(path))
  return path


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'calm_jax.convert', *args], capture_output=True,
                        text=True, timeout=300, check=False)


def test_converts_and_logs_progress(hf_dir, tmp_path):
  out = tmp_path / 'lm'
  result = _run(f'--hf_dir={hf_dir}', f'--output_dir={out}', '--dtype=bfloat16')
  assert result.returncode == 0, result.stderr
  document = json.loads((out / 'config.json').read_text())
  assert document['config']['param_dtype'] == 'bfloat16'
  assert 'qwen3: 3 layers' in result.stderr
  assert f'wrote {out}' in result.stderr
  assert 'orbax' not in result.stderr.lower()  # Library chatter is filtered.


def test_bad_input_exits_nonzero_with_the_reason(tmp_path):
  result = _run(f'--hf_dir={tmp_path / "missing"}', f'--output_dir={tmp_path / "lm"}')
  assert result.returncode != 0
  assert 'calm-convert: Checkpoint directory' in result.stderr
  assert 'does not exist' in result.stderr


def test_expect_preset_refuses_another_model(hf_dir, tmp_path):
  result = _run(f'--hf_dir={hf_dir}', f'--output_dir={tmp_path / "lm"}',
                '--expect_preset=qwen3_0_6b')
  assert result.returncode != 0
  assert 'not the expected architecture' in result.stderr
  assert not (tmp_path / 'lm').exists()
