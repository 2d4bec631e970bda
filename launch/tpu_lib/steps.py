"""Plans of commands: their steps, printed with --dry-run or run one after another."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence, TextIO

from .quoting import shell_join


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
    args: parsed flags (dry_run, poll_interval, wait_timeout, gcloud).

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
