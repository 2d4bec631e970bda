"""launch/tpu.py: the gcloud commands it prints (--dry-run) and runs, and its errors."""

import importlib.util
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest

NAME, ZONE, PROJECT = 'calm-pod', 'us-central2-b', 'my-project'
TRAIN = ['calm-train', '--gin_file=runs/compose.gin', '--gin_file=bridges/default.gin',
         '--gin_file=tasks/kv_arithmetic.gin', "--gin.MODEL_DIR='gs://bucket/calm run'",
         "--gin.ANCHOR_CHECKPOINT='gs://bucket/m_b/lm'",
         "--gin.AUGMENT_CHECKPOINT='gs://bucket/m_a/lm'",
         "--gin.MIXTURE_OR_TASK_NAME='kv_arithmetic_held_in'",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 6, 'targets': 6}", '--gin.TRAIN_STEPS=1000',
         '--gin_bindings=train_lib.train.log_every = 50']


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('TPU_') and k != 'GCLOUD'}
  env.update(extra)
  return env


def _tpu(repo_root, *args, env=None, check=True):
  """Runs launch/tpu.py; the flags before `--` must hold --dry-run or a fake --gcloud."""
  result = subprocess.run([sys.executable, str(repo_root / 'launch' / 'tpu.py'), *args],
                          capture_output=True, text=True, env=env or _env(), timeout=60,
                          check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(stdout):
  """The printed commands, split as a shell would; `#` lines are comments."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith('#')]


def _flag(argv, name):
  values = [a[len(name) + 1:] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def _contains(words, sub):
  return any(words[i:i + len(sub)] == sub for i in range(len(words) - len(sub) + 1))


@pytest.fixture(scope='module')
def up(repo_root):
  """The dry-run of `up` on a v4-32: its stdout and stderr."""
  return _tpu(repo_root, 'up', f'--name={NAME}', f'--zone={ZONE}', f'--project={PROJECT}',
              '--accelerator-type=v4-32', '--repo=https://example.com/calm_jax.git',
              '--ref=v1.2', '--dry-run', '--', *TRAIN)


def test_up_prints_create_wait_install_run(up):
  result = up
  assert result.stderr == ''  # Every path is on gs://: no warning.
  create, describe, install, run = _commands(result.stdout)
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', NAME]
  assert _flag(create, '--zone') == ZONE
  assert _flag(create, '--accelerator-type') == 'v4-32'
  assert _flag(create, '--version') == 'tpu-ubuntu2204-base'
  assert _flag(create, '--project') == PROJECT
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', NAME]
  assert '# repeat until it prints READY:' in result.stdout
  for ssh in (install, run):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', NAME]
    assert _flag(ssh, '--zone') == ZONE
    assert _flag(ssh, '--worker') == 'all'
    assert _flag(ssh, '--project') == PROJECT
  setup = shlex.split(_flag(install, '--command'))
  assert _contains(setup, ['git', 'clone', 'https://example.com/calm_jax.git', 'calm_jax;'])
  assert _contains(setup, ['git', 'fetch', 'origin', 'v1.2;'])
  assert _contains(setup, ['pip', 'install', '-q', '-c', 'constraints.txt', '-e', '.[tpu];'])
  script = _flag(run, '--command')
  words = shlex.split(script)
  # The remote shell gets calm-train's argv exactly, gin quotes included, under nohup, with
  # --multiprocess added: the workers join one JAX program.
  assert _contains(words, ['nohup', TRAIN[0], '--multiprocess', *TRAIN[1:], '>', 'logs/run.log',
                           '2>&1', '<', '/dev/null', '&'])


def _launch_module(repo_root, monkeypatch):
  spec = importlib.util.spec_from_file_location('tpu_launch', repo_root / 'launch' / 'tpu.py')
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)
  return module


def test_multiprocess_is_added_to_training_commands_only_once(repo_root, monkeypatch):
  module = _launch_module(repo_root, monkeypatch)
  assert module.with_multiprocess(['calm-train', '--gin_file=a.gin']) == [
      'calm-train', '--multiprocess', '--gin_file=a.gin']
  assert module.with_multiprocess(['python3', '-m', 'calm_jax.cli.train', '--gin_file=a.gin']) == [
      'python3', '-m', 'calm_jax.cli.train', '--multiprocess', '--gin_file=a.gin']
  for unchanged in (['calm-train', '--multiprocess', '--gin_file=a.gin'],
                    ['calm-train', '--coordinator_address=10.0.0.2:1234', '--num_processes=2'],
                    ['calm-eval', '--gin_file=runs/eval.gin'], ['nvidia-smi']):
    assert module.with_multiprocess(unchanged) == unchanged


def test_printed_lines_read_the_same_in_bash_and_shlex(up):
  for line in up.stdout.splitlines():
    if line.startswith('#'):
      continue
    words = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + line], capture_output=True,
                           text=True, check=True).stdout.split('\0')[:-1]
    assert words == shlex.split(line)


def test_gin_quotes_stay_readable(up):
  run = up.stdout.splitlines()[-1]
  assert '--gin.MODEL_DIR=\\"\'gs://bucket/calm run\'\\"' in run
  assert '--gin.TASK_FEATURE_LENGTHS=\\"{\'inputs\': 6, \'targets\': 6}\\"' in run


def _alive(pid):
  """Whether a process runs (a zombie waiting for its reaper counts as ended)."""
  if os.path.isdir('/proc/self'):
    try:
      with open(f'/proc/{pid}/stat') as f:
        return f.read().rpartition(')')[2].split()[0] != 'Z'
    except FileNotFoundError:
      return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_run_script_starts_the_job_under_nohup(repo_root, tmp_path):
  """The remote line of `run`, executed by bash in a fake home: argv, log, pid, refusal, stop."""
  bindir = tmp_path / 'calm_jax' / '.venv' / 'bin'
  bindir.mkdir(parents=True)
  (bindir / 'python').write_text('#!/bin/sh\n')
  (bindir / 'calm-train').write_text(
      '#!/bin/sh\nprintf "%s\\0" "$@" > argv.bin\necho "step 1/1000  $GREETING"\nexec sleep 30\n')
  for stub in bindir.iterdir():
    stub.chmod(0o755)

  def remote(subcommand, *extra):
    argv = _commands(_tpu(repo_root, subcommand, f'--name={NAME}', f'--zone={ZONE}',
                          '--dry-run', *extra).stdout)[-1]
    return subprocess.run(['bash', '-c', _flag(argv, '--command')], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)

  started = remote('run', '--env=GREETING=hello there', '--', *TRAIN)
  assert started.returncode == 0, started.stderr
  assert 'started pid' in started.stdout
  pid = int((tmp_path / 'calm_jax' / 'logs' / 'run.pid').read_text())
  try:
    argv_file = tmp_path / 'calm_jax' / 'argv.bin'
    for _ in range(100):
      if argv_file.exists() and argv_file.stat().st_size:
        break
      time.sleep(0.05)
    assert argv_file.read_text().split('\0')[:-1] == ['--multiprocess', *TRAIN[1:]]
    assert 'step 1/1000  hello there' in (tmp_path / 'calm_jax' / 'logs' / 'run.log').read_text()
    again = remote('run', '--', *TRAIN)
    assert again.returncode == 1 and 'still running' in again.stderr
    stopped = remote('stop')
    assert 'stopped run' in stopped.stdout
    for _ in range(100):
      if not _alive(pid):
        break
      time.sleep(0.05)
    else:
      pytest.fail('the job outlived stop')
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_queued_resource_create_and_wait(repo_root):
  result = _tpu(repo_root, 'create', f'--name={NAME}', f'--zone={ZONE}', '--queued', '--spot',
                '--accelerator-type=v5p-128', '--wait', '--dry-run')
  create, describe_queued, describe_node = _commands(result.stdout)
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', NAME]
  assert _flag(create, '--node-id') == NAME
  assert _flag(create, '--zone') == ZONE
  assert _flag(create, '--accelerator-type') == 'v5p-128'
  assert _flag(create, '--runtime-version') == 'v2-alpha-tpuv5'
  assert '--spot' in create and '--best-effort' not in create
  assert describe_queued[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']
  assert _flag(describe_queued, '--format') == 'value(state.state)'
  assert describe_node[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe']
  assert '# repeat until it prints ACTIVE:' in result.stdout


def test_best_effort_uses_the_alpha_command(repo_root):
  result = _tpu(repo_root, 'create', f'--name={NAME}', f'--zone={ZONE}', '--queued',
                '--best-effort', '--accelerator-type=v5litepod-16', '--dry-run')
  (create,) = _commands(result.stdout)
  assert create[:6] == ['gcloud', 'alpha', 'compute', 'tpus', 'queued-resources', 'create']
  assert '--best-effort' in create
  assert _flag(create, '--runtime-version') == 'v2-alpha-tpuv5-lite'


@pytest.mark.parametrize('queued,expected', [
    (False, ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', NAME, f'--zone={ZONE}',
             '--quiet']),
    (True, ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', NAME, f'--zone={ZONE}',
            '--force', '--quiet']),
])
def test_delete(repo_root, queued, expected):
  args = ['delete', f'--name={NAME}', f'--zone={ZONE}', '--dry-run'] + ['--queued'] * queued
  assert _commands(_tpu(repo_root, *args).stdout) == [expected]


@pytest.mark.parametrize('worker', [None, '3'])
def test_logs_follows_one_worker(repo_root, worker):
  args = ['logs', f'--name={NAME}', f'--zone={ZONE}', '--job=compose', '--dry-run']
  (ssh,) = _commands(_tpu(repo_root, *args + ([f'--worker={worker}'] if worker else [])).stdout)
  assert _flag(ssh, '--worker') == (worker or '0')
  assert shlex.split(_flag(ssh, '--command')) == ['tail', '-n', '100', '-F',
                                                  'calm_jax/logs/compose.log']


def test_environment_defaults(repo_root):
  env = _env(TPU_NAME=NAME, TPU_ZONE=ZONE, TPU_PROJECT=PROJECT)
  (ssh,) = _commands(_tpu(repo_root, 'run', '--dry-run', '--', *TRAIN, env=env).stdout)
  assert ssh[5] == NAME and _flag(ssh, '--zone') == ZONE and _flag(ssh, '--project') == PROJECT


def test_install_from_a_local_tree(repo_root, tmp_path):
  source = tmp_path / 'src'
  (source / '.venv' / 'bin').mkdir(parents=True)
  (source / '.venv' / 'bin' / 'python').write_text('big')
  (source / 'calm_jax').mkdir()
  (source / 'calm_jax' / 'train.py').write_text('# code')
  (source / 'setup.py').write_text('# setup')
  env = _env(TMPDIR=str(tmp_path))
  tar, scp, ssh = _commands(_tpu(repo_root, 'install', f'--name={NAME}', f'--zone={ZONE}',
                                 f'--source={source}', '--dry-run', env=env).stdout)
  assert tar[0] == 'tar' and '--exclude=.venv' in tar and '--exclude=.git' in tar
  archive = tar[2]
  assert scp[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive]
  assert scp[6] == f'{NAME}:calm_jax-src.tar.gz' and _flag(scp, '--worker') == 'all'
  setup = shlex.split(_flag(ssh, '--command'))
  assert _contains(setup, ['tar', '-xzf', 'calm_jax-src.tar.gz', '-C', 'calm_jax;'])
  subprocess.run(tar, check=True)
  members = subprocess.run(['tar', '-tzf', archive], capture_output=True, text=True,
                           check=True).stdout.split()
  assert './calm_jax/train.py' in members and './setup.py' in members
  assert not [m for m in members if '.venv' in m]


@pytest.mark.parametrize('args,message', [
    (['run', f'--name={NAME}', '--dry-run', '--', 'calm-train'], 'missing --zone'),
    (['run', f'--zone={ZONE}', '--dry-run', '--', 'calm-train'], 'missing --name'),
    (['run', f'--name={NAME}', '--zone=us-central2', '--dry-run', '--', 'x'], 'bad --zone'),
    (['create', f'--name={NAME}', f'--zone={ZONE}', '--accelerator-type=v5e-16', '--dry-run'],
     "bad accelerator type 'v5e-16'"),
    (['create', f'--name={NAME}', f'--zone={ZONE}', '--accelerator-type=tpu-32', '--dry-run'],
     "bad accelerator type 'tpu-32'"),
    (['create', f'--name={NAME}', f'--zone={ZONE}', '--accelerator-type=v4-12', '--dry-run'],
     "bad accelerator type 'v4-12'"),
    (['create', f'--name={NAME}', f'--zone={ZONE}', '--dry-run'], 'missing --accelerator-type'),
    (['run', f'--name={NAME}', f'--zone={ZONE}', '--dry-run'], 'run needs a command'),
    (['run', f'--name={NAME}', f'--zone={ZONE}', '--dry-run', '--'], 'run needs a command'),
    (['up', f'--name={NAME}', f'--zone={ZONE}', '--accelerator-type=v4-8', '--dry-run'],
     'run needs a command'),
    (['logs', f'--name={NAME}', f'--zone={ZONE}', '--dry-run', '--', 'x'], 'takes no command'),
    (['run', f'--name={NAME}', f'--zone={ZONE}', '--worker=first', '--dry-run', '--', 'x'],
     'bad --worker'),
])
def test_errors_are_one_line(repo_root, args, message):
  result = _tpu(repo_root, *args, check=False)
  assert result.returncode == 2
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize('accelerator,warned', [
    ('v4-32', 'the 4 workers of a v4-32'), ('v5litepod-16', 'the 4 workers of a v5litepod-16'),
    (None, 'multi-host slice'), ('v5litepod-8', None),
])
def test_local_model_dir_warns_on_multi_host_slices(repo_root, accelerator, warned):
  args = ['run', f'--name={NAME}', f'--zone={ZONE}', '--dry-run']
  args += [f'--accelerator-type={accelerator}'] if accelerator else []
  result = _tpu(repo_root, *args, '--', 'calm-train', "--gin.MODEL_DIR='/tmp/run'",
                "--gin_bindings=ANCHOR_CHECKPOINT = 'gs://b/lm'")
  if warned:
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("warning: MODEL_DIR='/tmp/run' is not a gs:// path") and warned in \
        warning
  else:
    assert result.stderr == ''
  assert len(_commands(result.stdout)) == 1


def _fake_gcloud(tmp_path, states):
  """A gcloud that records its argv and answers `describe` with the given states in turn."""
  (tmp_path / 'states').write_text('\n'.join(states) + '\n')
  fake = tmp_path / 'gcloud'
  fake.write_text(f'''#!{sys.executable}
import json, sys
with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'fail' in sys.argv[1:]:
  sys.exit(7)
if 'describe' in sys.argv:
  path = {str(tmp_path / 'states')!r}
  states = open(path).read().split()
  print(states[0])
  open(path, 'w').write('\\n'.join(states[1:] or states) + '\\n')
''')
  fake.chmod(0o755)
  return fake


def _calls(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  return [json.loads(line) for line in (tmp_path / 'calls.jsonl').read_text().splitlines()]


def test_create_runs_gcloud_and_waits_until_ready(repo_root, tmp_path):
  fake = _fake_gcloud(tmp_path, ['CREATING', 'CREATING', 'READY'])
  result = _tpu(repo_root, 'create', f'--name={NAME}', f'--zone={ZONE}', f'--gcloud={fake}',
                '--accelerator-type=v6e-8', '--wait', '--poll-interval=0')
  calls = _calls(tmp_path)
  assert calls[0] == ['compute', 'tpus', 'tpu-vm', 'create', NAME, f'--zone={ZONE}',
                      '--accelerator-type=v6e-8', '--version=v2-alpha-tpuv6e']
  assert [c[3] for c in calls[1:]] == ['describe'] * 3
  assert 'waiting: CREATING' in result.stderr and 'ready: READY' in result.stderr


def test_wait_stops_on_a_failed_queued_resource(repo_root, tmp_path):
  fake = _fake_gcloud(tmp_path, ['WAITING_FOR_RESOURCES', 'FAILED'])
  result = _tpu(repo_root, 'create', f'--name={NAME}', f'--zone={ZONE}', f'--gcloud={fake}',
                '--accelerator-type=v6e-8', '--queued', '--wait', '--poll-interval=0',
                check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'tpu.py create: error: the TPU is FAILED, not ACTIVE')


def test_a_failing_gcloud_stops_with_one_line(repo_root, tmp_path):
  fake = _fake_gcloud(tmp_path, ['READY'])
  result = _tpu(repo_root, 'delete', '--name=fail', f'--zone={ZONE}', f'--gcloud={fake}',
                check=False)
  assert result.returncode == 1
  assert _calls(tmp_path) == [['compute', 'tpus', 'tpu-vm', 'delete', 'fail', f'--zone={ZONE}',
                               '--quiet']]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('tpu.py delete: error: ') and 'exit status 7' in last


def test_shell_quote_round_trips(repo_root, monkeypatch):
  tpu = _launch_module(repo_root, monkeypatch)
  rng = random.Random(0)
  alphabet = 'ab \'"$`!\\=-.(){};&|*?~#:,%@\n'
  words = ['', "--gin.X=''", "--gin.MODEL_DIR='gs://b'", 'a! b', 'a!b', "it's $HOME"]
  words += [''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(500)]
  line = tpu.shell_join(words)
  assert shlex.split(line) == words
  out = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + line], capture_output=True, text=True,
                       check=True).stdout
  assert out.split('\0')[:-1] == words
