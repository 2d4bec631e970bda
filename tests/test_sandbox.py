"""calm_jax.sandbox: programs a model wrote run contained; hostile ones end as failures within
their limits and harm nothing; HumanEval's canonical solutions pass and empty bodies fail."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from calm_jax import sandbox
from calm_tasks import code_formats

QUICK = sandbox.Limits(wall_seconds=5, cpu_seconds=3)
SLACK = 3.0  # Seconds of process start and teardown allowed beyond a limit.


def _sandbox_processes() -> list[int]:
  """Pids of processes whose command line names a sandbox scratch directory."""
  pids = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        if b'calm_sandbox_' in f.read():
          pids.append(int(entry))
    except OSError:
      pass
  return pids


def _run(program, limits=QUICK):
  return sandbox.run(textwrap.dedent(program), limits)


def test_a_correct_program_passes_and_a_wrong_one_fails():
  ok = _run('print(sum(range(10)))')
  assert ok.passed and ok.status == 'passed' and ok.stdout.strip() == '45'
  for program, expected in (('assert 1 == 2', 'AssertionError'),
                            ('def f(:\n  pass', 'SyntaxError'),
                            ('raise SystemExit(3)', None)):
    outcome = _run(program)
    assert outcome.status == 'failed', (program, outcome)
    if expected:
      assert expected in outcome.stderr
  assert _run('raise SystemExit(3)').reason == 'exit 3'


def test_the_program_reads_and_writes_its_scratch_directory_which_is_then_removed():
  outcome = _run('''
      import os
      with open('notes.txt', 'w') as f:
        f.write('kept here')
      os.mkdir('sub')
      print(os.getcwd())
      print(open('notes.txt').read())
  ''')
  assert outcome.passed, outcome.stderr
  scratch, text = outcome.stdout.split()[0], outcome.stdout.split('\n')[1]
  assert 'calm_sandbox_' in scratch and text == 'kept here'
  assert not os.path.exists(scratch)


def test_an_infinite_loop_ends_at_the_wall_clock_limit():
  limits = sandbox.Limits(wall_seconds=2, cpu_seconds=60)
  outcome = _run('import time\nwhile True: time.sleep(0.01)', limits)
  assert outcome.status == 'timeout' and 'wall-clock' in outcome.reason
  assert 2 <= outcome.seconds < 2 + SLACK
  assert not _sandbox_processes()


def test_a_busy_loop_ends_at_the_cpu_limit():
  outcome = _run('while True: pass', sandbox.Limits(wall_seconds=30, cpu_seconds=1))
  assert outcome.status == 'timeout' and 'CPU' in outcome.reason, outcome
  assert outcome.seconds < 1 + SLACK


@pytest.mark.parametrize('bomb', [
    'import os\nwhile True:\n  os.fork()',
    'import subprocess, sys\nwhile True:\n  subprocess.Popen([sys.executable, "-c", "pass"])',
    'import os\nos.system("sh -c \':(){ :|:& };:\'")',
    'import os\nos.posix_spawn("/bin/sh", ["sh"], {})',
    'import threading\nwhile True:\n  threading.Thread(target=lambda: None).start()',
    'import ctypes\nctypes.CDLL(None).fork()',
])
def test_a_fork_bomb_fails_and_leaves_no_process(bomb):
  before = time.perf_counter()
  outcome = _run(bomb)
  assert outcome.status in ('failed', 'timeout'), outcome
  assert time.perf_counter() - before < QUICK.wall_seconds + SLACK
  assert not _sandbox_processes()


def test_a_10_gb_allocation_fails_fast():
  outcome = _run('x = bytearray(10 * 2**30)\nprint("allocated")')
  assert outcome.status == 'failed' and 'MemoryError' in outcome.stderr
  assert 'allocated' not in outcome.stdout and outcome.seconds < SLACK


def test_writes_outside_the_scratch_directory_change_nothing(tmp_path):
  target = tmp_path / 'outside.txt'
  existing = tmp_path / 'existing.txt'
  existing.write_text('original')
  for program in (f'open({str(target)!r}, "w").write("pwned")',
                  f'import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)',
                  f'open({str(existing)!r}, "a").write("pwned")',
                  f'import os\nos.remove({str(existing)!r})',
                  f'import os\nos.rename({str(existing)!r}, "mine.txt")',
                  f'import shutil\nshutil.rmtree({str(tmp_path)!r})',
                  f'import os\nos.chdir({str(tmp_path)!r})\nopen("outside.txt", "w")',
                  'open("../escape.txt", "w").write("pwned")',
                  f'import os\nos.symlink({str(existing)!r}, "link")\nopen("link", "w")'):
    outcome = _run(program)
    assert outcome.status == 'failed' and 'PermissionError' in outcome.stderr, (program,
                                                                                outcome)
  assert not target.exists() and existing.read_text() == 'original'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['existing.txt']


def test_a_connection_to_a_local_listener_never_arrives():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    for program in (f'import socket\nsocket.create_connection(("127.0.0.1", {port}), 2)',
                    f'import _socket\ns = _socket.socket()\ns.connect(("127.0.0.1", {port}))',
                    'import urllib.request\nurllib.request.urlopen("http://127.0.0.1:%d")'
                    % port):
      outcome = _run(program)
      assert outcome.status == 'failed', (program, outcome)
    with pytest.raises(socket.timeout):
      listener.accept()


def test_it_cannot_signal_another_process_or_its_parent():
  victim = subprocess.Popen(['sleep', '60'])
  try:
    for program in (f'import os, signal\nos.kill({victim.pid}, signal.SIGKILL)',
                    f'import os, signal\nos.killpg({victim.pid}, signal.SIGKILL)',
                    'import os, signal\nos.kill(-1, signal.SIGKILL)'):
      assert _run(program).status == 'failed', program
    assert victim.poll() is None  # Still alive.
  finally:
    victim.kill()
    victim.wait()
  # Its parent: a process that runs the sandbox, and must live to report the outcome.
  code = ('from calm_jax import sandbox\n'
          'o = sandbox.run("import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)")\n'
          'print("parent alive", o.status)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0 and 'parent alive failed' in result.stdout, result.stderr


def test_it_sees_none_of_the_parents_environment(monkeypatch):
  monkeypatch.setenv('CALM_SANDBOX_SECRET', 'hunter2-secret')
  outcome = _run('''
      import os
      print(sorted(os.environ))
      print(os.environ.get('CALM_SANDBOX_SECRET'))
      for path in ('/proc/%d/environ' % os.getppid(), '/proc/1/environ'):
        try:
          print(open(path, 'rb').read())
        except OSError as e:
          print('refused', type(e).__name__)
  ''')
  assert outcome.passed, outcome.stderr
  assert 'hunter2' not in outcome.stdout + outcome.stderr
  assert outcome.stdout.count('refused') == 2
  names = eval(outcome.stdout.splitlines()[0])  # pylint: disable=eval-used
  assert 'CALM_SANDBOX_SECRET' not in names and set(names) <= {
      'PATH', 'LANG', 'HOME', 'TMPDIR', 'PYTHONHASHSEED', 'PYTHONDONTWRITEBYTECODE'}


def test_output_and_files_are_bounded():
  limits = sandbox.Limits(wall_seconds=10, cpu_seconds=10, file_bytes=1 << 20,
                          output_chars=100)
  flood = _run('while True:\n  print("x" * 1000)', limits)
  assert flood.status == 'failed' and flood.seconds < 10  # SIGXFSZ at 1 MB.
  assert len(flood.stdout) <= 100
  big = _run('open("big", "wb").write(b"0" * (2 << 20))', limits)
  assert big.status == 'failed'


def test_network_isolation_and_privileges_are_reported():
  outcome = _run('print(1)')
  assert isinstance(outcome.network_isolated, bool) and isinstance(outcome.unprivileged, bool)
  if os.getuid() != 0:
    assert outcome.unprivileged


def test_run_many_keeps_order_and_runs_each_program_apart():
  programs = [f'import os\nprint({i}, os.getpid())' for i in range(6)]
  outcomes = sandbox.run_many(programs, QUICK, workers=2)
  assert [int(o.stdout.split()[0]) for o in outcomes] == list(range(6))
  assert len({o.stdout.split()[1] for o in outcomes}) == 6
  assert sandbox.run_many([], QUICK) == []


def test_every_canonical_humaneval_solution_passes_and_every_empty_body_fails():
  problems = code_formats.humaneval_problems()
  assert len(problems) == 164
  canonical = [code_formats.humaneval_program(p, p['canonical_solution'])
               for p in problems.values()]
  stubs = [code_formats.humaneval_program(p, code_formats.STUB_BODY) for p in problems.values()]
  outcomes = sandbox.run_many(canonical + stubs, sandbox.Limits(wall_seconds=20, cpu_seconds=20))
  passed = {tid: o for tid, o in zip(problems, outcomes[:164]) if not o.passed}
  assert not passed, {tid: (o.reason, o.stderr[-300:]) for tid, o in passed.items()}
  stubbed = [tid for tid, o in zip(problems, outcomes[164:]) if o.passed]
  assert not stubbed
