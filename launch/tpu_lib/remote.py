"""The shell lines the workers run (through `tpu-vm ssh --command`): install, start, logs, stop.

Every line is for a POSIX shell on a worker, in the home directory; the checkout is
REMOTE_DIR (--remote-dir) and a job keeps its output and process id in REMOTE_DIR/logs.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Sequence

from .quoting import quote_value, shell_join, shell_quote
from .steps import LaunchError
from .validation import check_job, remote_path

REMOTE_ARCHIVE = 'calm_jax-src.tar.gz'  # Where `install --source` copies its tar archive.
MULTIPROCESS_FLAGS = ('--multiprocess', '--coordinator_address')


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


def install_script(args: argparse.Namespace, remote: str) -> str:
  """The remote shell line that puts the code in place and installs it with the `tpu` extra.

  Args:
    args: parsed flags (repo, ref, python).
    remote: the checkout on the workers, as remote_path returns it.

  Returns:
    A shell command line: with --repo a git clone (once) and a checkout of --ref; otherwise the
    unpacking of REMOTE_ARCHIVE, copied to the home directory beforehand. Then the venv.
  """
  if args.repo:
    lines = [f'[ -d {remote}/.git ] || git clone {shell_quote(args.repo)} {remote}',
             f'cd {remote}',
             f'git fetch origin {shell_quote(args.ref)}',
             'git checkout --detach FETCH_HEAD']
  else:
    lines = [f'mkdir -p {remote}',
             f'tar -xzf {REMOTE_ARCHIVE} -C {remote}',
             f'rm -f {REMOTE_ARCHIVE}',
             f'cd {remote}']
  return '; '.join(['set -e'] + lines + _venv_script(args.python))


def _job_paths(args: argparse.Namespace) -> tuple[str, str, str]:
  remote = remote_path(args.remote_dir)
  job = check_job(args.job)
  return remote, f'logs/{job}.log', f'logs/{job}.pid'


def with_multiprocess(command: Sequence[str]) -> list[str]:
  """`command` with `--multiprocess` after `calm-train` (or `python -m calm_jax.cli.train`).

  Every worker runs the same training command, and the processes must join one JAX program
  (`jax.distributed.initialize()`, which on Cloud TPU finds its peers itself; one host works the
  same way). Other commands, and commands that already pass a multi-process flag, are unchanged.

  Args:
    command: the argv run on every worker.

  Returns:
    A new list: the argv, with `--multiprocess` added where it belongs.
  """
  command = list(command)
  if any(word.split('=')[0] in MULTIPROCESS_FLAGS for word in command):
    return command
  if command and os.path.basename(command[0]) == 'calm-train':
    return command[:1] + ['--multiprocess'] + command[1:]
  for i in range(len(command) - 1):
    if command[i] == '-m' and command[i + 1] == 'calm_jax.cli.train':
      return command[:i + 2] + ['--multiprocess'] + command[i + 2:]
  return command


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

  Raises:
    LaunchError: a bad --remote-dir, --job or --env.
  """
  remote, log, pid = _job_paths(args)
  exports = ['PATH="$PWD/.venv/bin:$PATH"', 'PYTHONUNBUFFERED=1']
  for assignment in args.env:
    key, sep, value = assignment.partition('=')
    if not sep or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
      raise LaunchError(f'bad --env {assignment!r}: expected NAME=VALUE')
    exports.append(f'{key}={quote_value(value)}')
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


def logs_script(args: argparse.Namespace) -> str:
  """The remote shell line that follows a job's log (Ctrl-C stops following, not the job).

  Args:
    args: parsed flags (remote_dir, job, lines).

  Returns:
    A shell command line.
  """
  remote, log, _ = _job_paths(args)
  return f'tail -n {args.lines} -F {remote}/{log}'


def stop_script(args: argparse.Namespace) -> str:
  """The remote shell line that stops a job (SIGTERM to the process in its pid file).

  Args:
    args: parsed flags (remote_dir, job).

  Returns:
    A shell command line.
  """
  remote, _, pid = _job_paths(args)
  pid = f'{remote}/{pid}'
  return (f'if [ -f {pid} ] && kill "$(cat {pid})" 2>/dev/null; then '
          f'echo "$(hostname): stopped {args.job}"; '
          f'else echo "$(hostname): {args.job} is not running"; fi')
