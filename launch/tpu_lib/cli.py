"""The command line of launch/tpu.py: its argument parser, the plan of a subcommand, main."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .gcloud import create_plan, delete_plan, install_plan, logs_plan, run_plan, stop_plan
from .steps import LaunchError, Step, execute
from .validation import (ACCELERATOR_EXAMPLES, RUNTIME_VERSIONS, check_name, check_worker,
                         check_zone, gin_path_warnings, parse_accelerator_type)


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
  check_name(args.name)
  check_zone(args.zone)
  if hasattr(args, 'worker'):
    check_worker(args.worker)
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
