"""The plan of each subcommand: the `gcloud compute tpus` commands it runs, as steps."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Sequence

from .remote import (REMOTE_ARCHIVE, install_script, logs_script, run_script, stop_script,
                     with_multiprocess)
from .steps import LaunchError, Step
from .validation import default_runtime_version, remote_path

# The checkout that `install` copies by default: the directory above launch/.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NODE_READY, NODE_FAILED = 'READY', ('PREEMPTED', 'TERMINATED', 'STOPPED', 'DELETING')
QUEUED_READY, QUEUED_FAILED = 'ACTIVE', ('FAILED', 'SUSPENDING', 'SUSPENDED', 'DELETING')

SOURCE_EXCLUDES = ('.git', '.venv', 'venv', '__pycache__', '*.pyc', '*.egg-info', '.pytest_cache')


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
  if not args.repo:
    source = os.path.abspath(args.source or REPO_ROOT)
    if not os.path.isfile(os.path.join(source, 'setup.py')):
      raise LaunchError(f'bad --source {source!r}: no setup.py there (expected a calm_jax tree)')
    archive = os.path.join(tempfile.gettempdir(), f'calm_jax-{args.name}.tar.gz')
    excludes = [f'--exclude={pattern}' for pattern in SOURCE_EXCLUDES + tuple(args.exclude)]
    steps.append(Step(['tar', '-czf', archive, *excludes, '-C', source, '.']))
    steps.append(Step(_gcloud(args, 'compute', 'tpus', 'tpu-vm', 'scp', archive,
                              f'{args.name}:{REMOTE_ARCHIVE}', f'--zone={args.zone}',
                              f'--worker={args.worker}')))
  steps.append(ssh_step(args, args.worker, install_script(args, remote)))
  return steps


def run_plan(args: argparse.Namespace, command: Sequence[str]) -> list[Step]:
  """Commands that start the same command on every worker (`with_multiprocess` applied).

  Args:
    args: parsed flags (worker, remote_dir, job, env).
    command: the argv to run, e.g. calm-train with its gin flags.

  Returns:
    The steps.

  Raises:
    LaunchError: no command, or a bad flag.
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
  return [ssh_step(args, args.worker, logs_script(args))]


def stop_plan(args: argparse.Namespace) -> list[Step]:
  """The command that stops a job on the workers (SIGTERM to the process in its pid file).

  Args:
    args: parsed flags (worker, remote_dir, job).

  Returns:
    The steps.
  """
  return [ssh_step(args, args.worker, stop_script(args))]


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
