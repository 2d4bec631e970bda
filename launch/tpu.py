#!/usr/bin/env python3
"""Runs calm_jax on Cloud TPU VMs and pod slices through `gcloud`.

  python launch/tpu.py create  --name=NAME --zone=ZONE --accelerator-type=v5litepod-16 [--queued]
  python launch/tpu.py install --name=NAME --zone=ZONE [--repo=URL --ref=REV | --source=DIR]
  python launch/tpu.py run     --name=NAME --zone=ZONE -- calm-train --gin_file=runs/compose.gin \
      --gin.MODEL_DIR="'gs://bucket/run'" ...
  python launch/tpu.py logs    --name=NAME --zone=ZONE [--worker=N]
  python launch/tpu.py stop    --name=NAME --zone=ZONE
  python launch/tpu.py delete  --name=NAME --zone=ZONE [--queued]
  python launch/tpu.py up      (create + install + run, taking the flags of all three)

Every subcommand takes --dry-run: it prints the commands, one a line and shell-quoted, instead
of running them. `--name`, `--zone`, `--project` and `--accelerator-type` default to the
environment variables TPU_NAME, TPU_ZONE, TPU_PROJECT and TPU_ACCELERATOR_TYPE.

On a pod slice every worker (host) runs the same command: JAX joins the hosts into one program,
and each host reads its own shard of the data. Workers share no disk, so MODEL_DIR and every
checkpoint path must be gs:// paths. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Accelerator families: FAMILY-SIZE. For v2, v3, v4 and v5p SIZE counts TensorCores (8 a host);
# for v5litepod (v5e) and v6e it counts chips (up to 8 on one host, 4 a host in larger slices).
CORE_COUNTED = ('v2', 'v3', 'v4', 'v5p')
CHIP_COUNTED = ('v5litepod', 'v6e')
CHIP_COUNTED_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5p': 'v2-alpha-tpuv5',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v6e': 'v2-alpha-tpuv6e',
}
ACCELERATOR_EXAMPLES = 'v5litepod-16, v5p-128, v4-32, v6e-8'

# gin macros naming paths that every worker reads or writes.
PATH_MACROS = ('MODEL_DIR', 'CHECKPOINT', 'ANCHOR_CHECKPOINT', 'AUGMENT_CHECKPOINT', 'EVAL_DIR',
               'INFER_OUTPUT_DIR', 'EXPORT_DIR', 'EXPERIMENT_DIR')

NODE_READY, NODE_FAILED = 'READY', ('PREEMPTED', 'TERMINATED', 'STOPPED', 'DELETING')
QUEUED_READY, QUEUED_FAILED = 'ACTIVE', ('FAILED', 'SUSPENDING', 'SUSPENDED', 'DELETING')

SOURCE_EXCLUDES = ('.git', '.venv', 'venv', '__pycache__', '*.pyc', '*.egg-info', '.pytest_cache')
REMOTE_ARCHIVE = 'calm_jax-src.tar.gz'


class LaunchError(Exception):
  """A bad flag or a failed step, reported as one line."""


class Step(NamedTuple):
  """One command of a plan.

  Attributes:
    argv: the command.
    wait_for: when set, the command is a status query repeated until it prints this state.
    fail_on: states that end the wait with an error.
  """
  argv: list[str]
  wait_for: Optional[str] = None
  fail_on: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Validation.


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
  """Splits and checks an accelerator type such as `v5litepod-16`.

  Args:
    accelerator_type: FAMILY-SIZE, e.g. v5litepod-16, v5p-128, v4-32, v6e-8.

  Returns:
    The family and the size.

  Raises:
    LaunchError: an unknown family or an impossible size.
  """
  families = CORE_COUNTED + CHIP_COUNTED
  accelerator_type = accelerator_type or ''
  match = re.fullmatch(r'([a-z0-9]+)-([1-9][0-9]*)', accelerator_type)
  if not match or match.group(1) not in families:
    hint = ''
    if accelerator_type.startswith('v5e-'):
      hint = '; v5e slices are named v5litepod-N'
    raise LaunchError(
        f'bad accelerator type {accelerator_type!r}: expected FAMILY-SIZE with FAMILY one of '
        f'{", ".join(families)} (e.g. {ACCELERATOR_EXAMPLES}){hint}')
  family, size = match.group(1), int(match.group(2))
  if family in CORE_COUNTED and size % 8:
    raise LaunchError(f'bad accelerator type {accelerator_type!r}: {family} sizes count '
                      'TensorCores, a multiple of 8 (e.g. v4-32)')
  if family in CHIP_COUNTED and size not in CHIP_COUNTED_SIZES:
    sizes = ', '.join(str(s) for s in CHIP_COUNTED_SIZES)
    raise LaunchError(f'bad accelerator type {accelerator_type!r}: {family} comes in sizes '
                      f'{sizes}')
  return family, size


def num_workers(accelerator_type: str) -> int:
  """The number of hosts (TPU VM workers) of a slice.

  Args:
    accelerator_type: a valid accelerator type, e.g. v4-32.

  Returns:
    How many workers `--worker=all` reaches, e.g. 4 for v4-32 and v5litepod-16.
  """
  family, size = parse_accelerator_type(accelerator_type)
  if family in CORE_COUNTED:
    return max(1, size // 8)
  return 1 if size <= 8 else size // 4


def default_runtime_version(accelerator_type: str) -> str:
  """The TPU software version recommended for JAX on an accelerator type.

  Args:
    accelerator_type: a valid accelerator type.

  Returns:
    e.g. `v2-alpha-tpuv5-lite` for v5litepod-16.
  """
  return RUNTIME_VERSIONS[parse_accelerator_type(accelerator_type)[0]]


def _check_name(name: Optional[str]) -> str:
  if not name:
    raise LaunchError('missing --name (or set TPU_NAME): the name of the TPU VM')
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', name):
    raise LaunchError(f'bad --name {name!r}: lower-case letters, digits and dashes, starting '
                      'with a letter')
  return name


def _check_zone(zone: Optional[str]) -> str:
  if not zone:
    raise LaunchError('missing --zone (or set TPU_ZONE), e.g. --zone=us-central2-b')
  if not re.fullmatch(r'[a-z]+-[a-z]+[0-9]+-[a-z]', zone):
    raise LaunchError(f'bad --zone {zone!r}: expected a zone such as us-central2-b, not a region')
  return zone


def _check_worker(worker: str) -> str:
  if not re.fullmatch(r'all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*', worker):
    raise LaunchError(f"bad --worker {worker!r}: expected 'all', an index (0), a list (0,2) or "
                      'a range (1-3)')
  return worker


def _check_job(job: str) -> str:
  if not re.fullmatch(r'[A-Za-z0-9_.-]+', job):
    raise LaunchError(f'bad --job {job!r}: letters, digits, dots, dashes and underscores only')
  return job


def remote_path(path: str) -> str:
  """A path on the workers, relative to the home directory unless absolute.

  Args:
    path: e.g. `calm_jax`, `~/calm_jax` or `/mnt/disk/calm_jax`.

  Returns:
    The path without a leading `~/` (quoting would stop the shell from expanding it).

  Raises:
    LaunchError: a path with characters that would need quoting.
  """
  if path.startswith('~/'):
    path = path[2:]
  path = path.rstrip('/') if path != '/' else path
  if not _SAFE.fullmatch(path or '~'):
    raise LaunchError(f'bad --remote-dir {path!r}: use letters, digits and ./_-, relative to the '
                      'home directory or absolute')
  return path


_SAFE = re.compile(r'[\w@%+=:,./-]+', re.ASCII)  # Words no POSIX shell changes (as shlex).
_FLAG_PREFIX = re.compile(r'(--?[A-Za-z0-9_][A-Za-z0-9_.-]*=)(.*)', re.DOTALL)
# bash and zsh expand `!` inside double quotes unless a blank, `=` or `(` follows it.
_HISTORY = re.compile(r'!(?![ \t\n=(])')


def _quote_mode(text: str, i: int) -> Optional[str]:
  """The quotes text[i] needs: `'` only double quotes, `$`, backquote and `!` single ones."""
  char = text[i]
  if char == "'":
    return '"'
  if char in '$`' or (char == '!' and _HISTORY.match(text, i)):
    return "'"
  return None


def _quote_value(value: str) -> str:
  """Quotes a string in runs of single and double quotes, cut at blanks where possible."""
  if _SAFE.fullmatch(value):
    return value
  runs = []
  mode, start, last_constrained = None, 0, -1
  for i in range(len(value)):
    need = _quote_mode(value, i)
    if need is None:
      continue
    if mode is not None and need != mode:
      blank = value.rfind(' ', last_constrained + 1, i)
      cut = blank + 1 if blank >= 0 else i
      runs.append((mode, value[start:cut]))
      start = cut
    mode, last_constrained = need, i
  runs.append((mode or "'", value[start:]))
  # Inside double quotes only `\`, `"`, `$` and backquote are special, and runs in double
  # quotes hold no `$` or backquote: shells and shlex.split read them alike.
  return ''.join(f"'{text}'" if quote == "'" else '"' + re.sub(r'([\\"])', r'\\\1', text) + '"'
                 for quote, text in runs)


def shell_quote(word: str) -> str:
  """Quotes one word for a POSIX shell, keeping it readable.

  Like shlex.quote, but `--flag=value` keeps its `--flag=` outside the quotes and single quotes
  go inside double quotes: `--gin.MODEL_DIR="'gs://b/run'"` stays as people write it instead of
  becoming `'--gin.MODEL_DIR='"'"'gs://b/run'"'"''`. Double-quoted runs hold no `$`, backquote
  or `!`, so a shell (bash, zsh, sh) and shlex.split read the result alike.

  Args:
    word: any string.

  Returns:
    A string that a POSIX shell and shlex.split read back as `word`.
  """
  match = _FLAG_PREFIX.fullmatch(word)
  if match:
    return match.group(1) + shell_quote(match.group(2)) if match.group(2) else word + "''"
  return _quote_value(word) if word else "''"


def shell_join(argv: Sequence[str]) -> str:
  """Quotes and joins a command line (see shell_quote).

  Args:
    argv: the words.

  Returns:
    One line that a POSIX shell splits back into `argv`.
  """
  return ' '.join(shell_quote(word) for word in argv)


def gin_path_warnings(command: Sequence[str], accelerator_type: Optional[str]) -> list[str]:
  """Warnings for gin path macros that are not gs:// paths where the workers share no disk.

  Args:
    command: the argv run on every worker, e.g. calm-train with `--gin.MODEL_DIR="'/tmp/x'"`.
    accelerator_type: the slice's type; None when unknown.

  Returns:
    One line per local path (none on a single-host slice).
  """
  workers = num_workers(accelerator_type) if accelerator_type else None
  if workers == 1:
    return []
  bindings = []
  args = list(command)
  for i, arg in enumerate(args):
    if arg.startswith('--gin.'):
      bindings.append(arg[len('--gin.'):])
    elif arg.startswith('--gin_bindings='):
      bindings.append(arg[len('--gin_bindings='):])
    elif arg == '--gin_bindings' and i + 1 < len(args):
      bindings.append(args[i + 1])
  warnings = []
  for binding in bindings:
    name, sep, value = binding.partition('=')
    name = name.strip()
    if not sep or name not in PATH_MACROS:
      continue
    try:
      path = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      path = value.strip()
    if not isinstance(path, str) or path.startswith('gs://'):
      continue
    where, hint = f'the {workers} workers of a {accelerator_type}', ''
    if not workers:
      where = 'the workers of a multi-host slice'
      hint = ' (--accelerator-type tells whether this slice has one host)'
    warnings.append(f'warning: {name}={path!r} is not a gs:// path: {where} share no disk, so '
                    f'each would read and write its own local copy; use gs://BUCKET/...{hint}')
  return warnings


# ----------------------------------------------------------------------------------------------
# Plans: the commands of each subcommand.


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
  argv = [args.gcloud, *words]
  if args.project:
    argv.append(f'--project={args.project}')
  return argv


def ssh_step(args: argparse.Namespace, worker: str, script: str) -> Step:
  """`gcloud compute tpus tpu-vm ssh` running a shell script on some workers.

  Args:
    args: parsed flags (name, zone, project, gcloud).
    worker: 'all', an index, a list or a range.
    script: the remote shell command line; passed as one argument, so quoting stays intact.

  Returns:
    The step.
  """
  return Step(_gcloud(args, 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, f'--zone={args.zone}',
                      f'--worker={worker}', f'--command={script}'))


def create_plan(args: argparse.Namespace, wait: bool) -> list[Step]:
  """Commands that create a TPU VM or a queued resource, then wait until it is ready.

  Args:
    args: parsed flags (name, zone, project, accelerator_type, runtime_version, queued, spot,
      best_effort).
    wait: whether to poll `describe` until the TPU is ready.

  Returns:
    The steps.
  """
  accelerator = args.accelerator_type
  runtime = args.runtime_version or default_runtime_version(accelerator)
  if args.queued:
    words = ['compute', 'tpus', 'queued-resources']
    if args.best_effort:  # Only the alpha command knows --best-effort.
      words.insert(0, 'alpha')
    argv = _gcloud(args, *words, 'create', args.name, f'--node-id={args.name}',
                   f'--zone={args.zone}', f'--accelerator-type={accelerator}',
                   f'--runtime-version={runtime}')
    argv += ['--spot'] * args.spot + ['--best-effort'] * args.best_effort
    steps = [Step(argv)]
    if wait:
      steps.append(Step(_gcloud(args, 'compute', 'tpus', 'queued-resources', 'describe',
                                args.name, f'--zone={args.zone}', '--format=value(state.state)'),
                        wait_for=QUEUED_READY, fail_on=QUEUED_FAILED))
  else:
    if args.best_effort:
      raise LaunchError('--best-effort needs --queued (a queued resource)')
    argv = _gcloud(args, 'compute', 'tpus', 'tpu-vm', 'create', args.name, f'--zone={args.zone}',
                   f'--accelerator-type={accelerator}', f'--version={runtime}')
    argv += ['--spot'] * args.spot
    steps = [Step(argv)]
  if wait:
    steps.append(Step(_gcloud(args, 'compute', 'tpus', 'tpu-vm', 'describe', args.name,
                              f'--zone={args.zone}', '--format=value(state)'),
                      wait_for=NODE_READY, fail_on=NODE_FAILED))
  return steps


def _venv_script(python: str) -> list[str]:
  lines = []
  if re.fullmatch(r'python3\.[0-9]+', python):
    # TPU VM images ship Ubuntu 22.04's Python 3.10; constraints.txt needs 3.11.
    lines.append(f'command -v {python} >/dev/null 2>&1 || {{ sudo apt-get update -qq && '
                 f'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {python} '
                 f'{python}-venv; }}')
  lines += [
      f'[ -x .venv/bin/python ] || {shell_quote(python)} -m venv .venv',
      '.venv/bin/python -m pip install -q --upgrade pip',
      ".venv/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'",
      ".venv/bin/python -c 'import jax; print(jax.__version__)'",
      'echo "$(hostname): calm_jax installed in $PWD/.venv"',
  ]
  return lines


def install_plan(args: argparse.Namespace) -> list[Step]:
  """Commands that put the code on every worker and install it with the `tpu` extra.

  Args:
    args: parsed flags (repo, ref, source, remote_dir, python, worker, exclude).

  Returns:
    The steps: with --repo a git clone and checkout on the workers; otherwise a tar archive of
    the local tree (without .git, .venv and caches) copied with `tpu-vm scp` and unpacked.
  """
  remote = remote_path(args.remote_dir)
  steps = []
  if args.repo:
    lines = [f'[ -d {remote}/.git ] || git clone {shell_quote(args.repo)} {remote}',
             f'cd {remote}',
             f'git fetch origin {shell_quote(args.ref)}',
             'git checkout --detach FETCH_HEAD']
  else:
    source = os.path.abspath(args.source or REPO_ROOT)
    if not os.path.isfile(os.path.join(source, 'setup.py')):
      raise LaunchError(f'bad --source {source!r}: no setup.py there (expected a calm_jax tree)')
    import tempfile  # pylint: disable=import-outside-toplevel
    archive = os.path.join(tempfile.gettempdir(), f'calm_jax-{args.name}.tar.gz')
    excludes = [f'--exclude={pattern}' for pattern in SOURCE_EXCLUDES + tuple(args.exclude)]
    steps.append(Step(['tar', '-czf', archive, *excludes, '-C', source, '.']))
    steps.append(Step(_gcloud(args, 'compute', 'tpus', 'tpu-vm', 'scp', archive,
                              f'{args.name}:{REMOTE_ARCHIVE}', f'--zone={args.zone}',
                              f'--worker={args.worker}')))
    lines = [f'mkdir -p {remote}',
             f'tar -xzf {REMOTE_ARCHIVE} -C {remote}',
             f'rm -f {REMOTE_ARCHIVE}',
             f'cd {remote}']
  script = '; '.join(['set -e'] + lines + _venv_script(args.python))
  steps.append(ssh_step(args, args.worker, script))
  return steps


def _job_paths(args: argparse.Namespace) -> tuple[str, str, str]:
  remote = remote_path(args.remote_dir)
  job = _check_job(args.job)
  return remote, f'logs/{job}.log', f'logs/{job}.pid'


def run_script(args: argparse.Namespace, command: Sequence[str]) -> str:
  """The remote shell line that starts `command` in the background on a worker.

  The job runs under nohup with stdin, stdout and stderr detached from the ssh session, so a
  dropped connection does not stop it; its output goes to REMOTE_DIR/logs/JOB.log and its
  process id to REMOTE_DIR/logs/JOB.pid. A job of the same name still running is not replaced.

  Args:
    args: parsed flags (remote_dir, job, env).
    command: the argv, e.g. ['calm-train', '--gin_file=runs/compose.gin', ...].

  Returns:
    A shell command line.
  """
  remote, log, pid = _job_paths(args)
  exports = ['PATH="$PWD/.venv/bin:$PATH"', 'PYTHONUNBUFFERED=1']
  for assignment in args.env:
    key, sep, value = assignment.partition('=')
    if not sep or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
      raise LaunchError(f'bad --env {assignment!r}: expected NAME=VALUE')
    exports.append(f'{key}={_quote_value(value)}')
  return '; '.join([
      'set -e',
      f'cd {remote}',
      '[ -x .venv/bin/python ] || { echo "$(hostname): no .venv in $PWD; run install first" >&2; '
      'exit 1; }',
      'mkdir -p logs',
      f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
      f'echo "$(hostname): job {args.job} is still running (pid $(cat {pid})); '
      f'stop it first" >&2; exit 1; fi',
      'export ' + ' '.join(exports),
      f'nohup {shell_join(command)} > {log} 2>&1 < /dev/null & echo $! > {pid}',
      f'echo "$(hostname): started pid $(cat {pid}), log {remote}/{log}"',
  ])


MULTIPROCESS_FLAGS = ('--multiprocess', '--coordinator_address')


def with_multiprocess(command: Sequence[str]) -> list[str]:
  """`command` with `--multiprocess` after `calm-train` (or `python -m calm_jax.train`).

  Every worker runs the same training command, and the processes must join one JAX program
  (`jax.distributed.initialize()`, which on Cloud TPU finds its peers itself; one host works the
  same way). Other commands, and commands that already pass a multi-process flag, are unchanged.
  """
  command = list(command)
  if any(word.split('=')[0] in MULTIPROCESS_FLAGS for word in command):
    return command
  if command and os.path.basename(command[0]) == 'calm-train':
    return command[:1] + ['--multiprocess'] + command[1:]
  for i in range(len(command) - 1):
    if command[i] == '-m' and command[i + 1] == 'calm_jax.train':
      return command[:i + 2] + ['--multiprocess'] + command[i + 2:]
  return command


def run_plan(args: argparse.Namespace, command: Sequence[str]) -> list[Step]:
  """Commands that start the same command on every worker (`with_multiprocess` applied).

  Args:
    args: parsed flags (worker, remote_dir, job, env).
    command: the argv to run, e.g. calm-train with its gin flags.

  Returns:
    The steps.
  """
  if not command:
    raise LaunchError("run needs a command after '--', e.g. run --name=N --zone=Z -- calm-train "
                      '--gin_file=runs/compose.gin ...')
  return [ssh_step(args, args.worker, run_script(args, with_multiprocess(command)))]


def logs_plan(args: argparse.Namespace) -> list[Step]:
  """The command that follows a job's log on one worker (Ctrl-C stops following, not the job).

  Args:
    args: parsed flags (worker, remote_dir, job, lines).

  Returns:
    The steps.
  """
  remote, log, _ = _job_paths(args)
  return [ssh_step(args, args.worker, f'tail -n {args.lines} -F {remote}/{log}')]


def stop_plan(args: argparse.Namespace) -> list[Step]:
  """The command that stops a job on the workers (SIGTERM to the process in its pid file).

  Args:
    args: parsed flags (worker, remote_dir, job).

  Returns:
    The steps.
  """
  remote, _, pid = _job_paths(args)
  pid = f'{remote}/{pid}'
  script = (f'if [ -f {pid} ] && kill "$(cat {pid})" 2>/dev/null; then '
            f'echo "$(hostname): stopped {args.job}"; '
            f'else echo "$(hostname): {args.job} is not running"; fi')
  return [ssh_step(args, args.worker, script)]


def delete_plan(args: argparse.Namespace) -> list[Step]:
  """The command that deletes the TPU VM, or the queued resource with its node.

  Args:
    args: parsed flags (name, zone, project, queued).

  Returns:
    The steps.
  """
  if args.queued:
    argv = _gcloud(args, 'compute', 'tpus', 'queued-resources', 'delete', args.name,
                   f'--zone={args.zone}', '--force', '--quiet')
  else:
    argv = _gcloud(args, 'compute', 'tpus', 'tpu-vm', 'delete', args.name, f'--zone={args.zone}',
                   '--quiet')
  return [Step(argv)]


# ----------------------------------------------------------------------------------------------
# Execution.


def print_plan(steps: Sequence[Step], out: TextIO = sys.stdout) -> None:
  """Prints the steps one a line, shell-quoted; a wait is a `#` comment and its query.

  Args:
    steps: the plan.
    out: where to print.
  """
  for step in steps:
    if step.wait_for:
      print(f'# repeat until it prints {step.wait_for}:', file=out)
    print(shell_join(step.argv), file=out)


def wait_until(step: Step, poll_interval: float, timeout: float,
               sleep: Callable[[float], None] = time.sleep) -> None:
  """Repeats a status query until it prints the state a step waits for.

  Args:
    step: a step with `wait_for` set.
    poll_interval: seconds between queries.
    timeout: seconds before giving up; 0 waits for ever.
    sleep: the sleep function.

  Raises:
    LaunchError: a failed state, a failed query or the timeout.
  """
  start = time.monotonic()
  last = None
  while True:
    result = subprocess.run(step.argv, capture_output=True, text=True, check=False)
    if result.returncode:
      last_line = (result.stderr.strip().splitlines() or [''])[-1]
      raise LaunchError(f'{shell_join(step.argv)} failed (exit {result.returncode}) {last_line}')
    state = result.stdout.strip()
    if state == step.wait_for:
      print(f'ready: {state}', file=sys.stderr)
      return
    if state in step.fail_on:
      raise LaunchError(f'the TPU is {state}, not {step.wait_for}')
    if state != last:
      print(f'waiting: {state or "(no state yet)"}', file=sys.stderr)
      last = state
    if timeout and time.monotonic() - start > timeout:
      raise LaunchError(f'still {state or "not ready"} after {timeout:g} s (--wait-timeout)')
    sleep(poll_interval)


def execute(steps: Sequence[Step], args: argparse.Namespace) -> None:
  """Runs the steps in order, streaming their output; or prints them with --dry-run.

  Args:
    steps: the plan.
    args: parsed flags (dry_run, poll_interval, wait_timeout).

  Raises:
    LaunchError: a command that is missing or fails.
  """
  if args.dry_run:
    print_plan(steps)
    return
  for step in steps:
    print('+ ' + shell_join(step.argv), file=sys.stderr, flush=True)
    try:
      if step.wait_for:
        wait_until(step, args.poll_interval, args.wait_timeout)
      else:
        subprocess.run(step.argv, check=True)
    except FileNotFoundError as e:
      hint = ''
      if step.argv[0] == args.gcloud:
        hint = ' (install the Google Cloud SDK or pass --gcloud=PATH)'
      raise LaunchError(f'{step.argv[0]} not found{hint}') from e
    except subprocess.CalledProcessError as e:
      raise LaunchError(f'{step.argv[0]} failed with exit status {e.returncode} (the command '
                        "after '+' above)") from e


# ----------------------------------------------------------------------------------------------
# Command line.


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
  return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of every subcommand.

  Returns:
    The parser; the command of `run` and `up` comes after `--` and is split off before it.
  """
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', default=_env('TPU_NAME'), help='TPU VM name [$TPU_NAME]')
  common.add_argument('--zone', default=_env('TPU_ZONE'), help='zone, e.g. us-central2-b '
                      '[$TPU_ZONE]')
  common.add_argument('--project', default=_env('TPU_PROJECT'), help='Google Cloud project '
                      '[$TPU_PROJECT; else gcloud\'s default]')
  common.add_argument('--dry-run', action='store_true',
                      help='print the commands instead of running them')
  common.add_argument('--gcloud', default=_env('GCLOUD', 'gcloud'), help='the gcloud binary')

  accel = argparse.ArgumentParser(add_help=False)
  accel.add_argument('--accelerator-type', default=_env('TPU_ACCELERATOR_TYPE'),
                     help=f'e.g. {ACCELERATOR_EXAMPLES} [$TPU_ACCELERATOR_TYPE]')

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument('--runtime-version', help='TPU software version (default: the one for '
                      'JAX on the accelerator: ' + ', '.join(
                          f'{k} {v}' for k, v in RUNTIME_VERSIONS.items()) + ')')
  create.add_argument('--queued', action='store_true', help='create a queued resource')
  create.add_argument('--spot', action='store_true', help='Spot VMs (preemptible)')
  create.add_argument('--best-effort', action='store_true',
                      help='best-effort queued resource (gcloud alpha; needs --queued)')
  create.add_argument('--poll-interval', type=float, default=30.0,
                      help='seconds between state queries while waiting')
  create.add_argument('--wait-timeout', type=float, default=0.0,
                      help='seconds to wait for the TPU to be ready; 0 waits for ever')

  remote = argparse.ArgumentParser(add_help=False)
  remote.add_argument('--remote-dir', default='calm_jax',
                      help='the checkout on the workers, relative to the home directory')

  install = argparse.ArgumentParser(add_help=False)
  source = install.add_mutually_exclusive_group()
  source.add_argument('--repo', help='git URL cloned on every worker')
  source.add_argument('--source', help='local tree copied to every worker (default: this '
                      'checkout, without .git, .venv and caches)')
  install.add_argument('--ref', default='HEAD', help='git revision to check out with --repo')
  install.add_argument('--python', default='python3.11',
                       help='interpreter of the venv (apt-installed if missing)')
  install.add_argument('--exclude', action='append', default=[],
                       help='more patterns left out of the --source archive')

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument('--job', default='run', help='job name: logs/JOB.log and logs/JOB.pid')

  run = argparse.ArgumentParser(add_help=False)
  run.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                   help='environment variable of the job (repeatable)')

  parser = argparse.ArgumentParser(
      prog='tpu.py', description='Run calm_jax on Cloud TPU VMs and pod slices.',
      epilog='run and up take the command after --, e.g. -- calm-train '
      '--gin_file=runs/compose.gin --gin.MODEL_DIR="\'gs://bucket/run\'"')
  sub = parser.add_subparsers(dest='subcommand', required=True, metavar='SUBCOMMAND')

  def add(name, parents, help_text, **worker):
    p = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
    if worker:
      p.add_argument('--worker', default=worker['default'], help='workers: all, N, N,M or N-M')
    return p

  p = add('create', [common, accel, create], 'create a TPU VM or a queued resource')
  p.add_argument('--wait', action='store_true', help='wait until the TPU is ready')
  add('install', [common, remote, install], 'put calm_jax on the workers and install it',
      default='all')
  add('run', [common, accel, remote, job, run], 'start a command on the workers (under nohup)',
      default='all')
  p = add('logs', [common, remote, job], "follow a worker's log", default='0')
  p.add_argument('--lines', type=int, default=100, help='lines of the log shown first')
  add('stop', [common, remote, job], 'stop the job on the workers', default='all')
  p = add('delete', [common], 'delete the TPU VM (or the queued resource)')
  p.add_argument('--queued', action='store_true', help='delete a queued resource and its node')
  add('up', [common, accel, create, remote, install, job, run], 'create + install + run',
      default='all')
  return parser


def plan(args: argparse.Namespace, command: Sequence[str]) -> list[Step]:
  """Validates the flags of a subcommand and builds its commands.

  Args:
    args: parsed flags.
    command: the argv after `--` (run and up only).

  Returns:
    The steps.

  Raises:
    LaunchError: a missing or bad flag.
  """
  if command and args.subcommand not in ('run', 'up'):
    raise LaunchError(f"{args.subcommand} takes no command after '--' (only run and up do)")
  _check_name(args.name)
  _check_zone(args.zone)
  if hasattr(args, 'worker'):
    _check_worker(args.worker)
  if getattr(args, 'accelerator_type', None):
    parse_accelerator_type(args.accelerator_type)
  elif args.subcommand in ('create', 'up'):
    raise LaunchError(f'missing --accelerator-type (or set TPU_ACCELERATOR_TYPE), e.g. '
                      f'{ACCELERATOR_EXAMPLES}')
  if args.subcommand in ('install', 'up') and args.repo is None and args.ref != 'HEAD':
    raise LaunchError('--ref needs --repo')
  if args.subcommand in ('run', 'up') and not command:
    run_plan(args, command)  # Raises the missing-command error before anything runs.
  if args.subcommand == 'create':
    return create_plan(args, wait=args.wait)
  if args.subcommand == 'install':
    return install_plan(args)
  if args.subcommand == 'run':
    return run_plan(args, command)
  if args.subcommand == 'logs':
    return logs_plan(args)
  if args.subcommand == 'stop':
    return stop_plan(args)
  if args.subcommand == 'delete':
    return delete_plan(args)
  return create_plan(args, wait=True) + install_plan(args) + run_plan(args, command)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point.

  Args:
    argv: the arguments after the program name; sys.argv[1:] when None.

  Returns:
    The exit status: 0, 2 for a bad flag, 1 for a failed command, 130 for Ctrl-C.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  command: list[str] = []
  if '--' in argv:
    split = argv.index('--')
    argv, command = argv[:split], argv[split + 1:]
  args = build_parser().parse_args(argv)
  try:
    steps = plan(args, command)
  except LaunchError as e:
    print(f'tpu.py {args.subcommand}: error: {e}', file=sys.stderr)
    return 2
  if args.subcommand in ('run', 'up'):
    for warning in gin_path_warnings(command, args.accelerator_type):
      print(warning, file=sys.stderr)
  try:
    execute(steps, args)
  except LaunchError as e:
    print(f'tpu.py {args.subcommand}: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
