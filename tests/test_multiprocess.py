"""Two processes (jax.distributed over 127.0.0.1) train, save and restore like one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = 'tests/multiprocess_steps.py'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(repo_root, devices):
  return dict(os.environ, PYTHONPATH=f'{repo_root}{os.pathsep}{repo_root / "tests"}',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                        '--xla_backend_optimization_level=0')


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, repo_root):
  one = tmp_path / 'one'
  one.mkdir()
  result = subprocess.run([sys.executable, str(repo_root / SCRIPT), f'--out={one}'],
                          env=_env(repo_root, 8), capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  two = tmp_path / 'two'
  two.mkdir()
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(repo_root / SCRIPT), '--num_processes=2', f'--process_id={i}',
       f'--port={port}', f'--out={two}'], env=_env(repo_root, 4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]

  a, b = np.load(one / 'result.npz'), np.load(two / 'result.npz')
  assert set(a.files) == set(b.files) and len(a.files) > 10
  np.testing.assert_allclose(b['losses'], a['losses'], rtol=0, atol=1e-5)
  for name in a.files:
    np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)
  # Both processes wrote the one checkpoint (orbax, multi-process).
  assert (two / 'run' / 'checkpoints' / '2').is_dir()
