"""Sandboxed execution of untrusted Python programs (code a model wrote).

  outcome = sandbox.run(program)                       # one program
  outcomes = sandbox.run_many(programs, workers=2)     # a bounded pool, one process each

Every program runs in a fresh `python -I` subprocess, in its own session and process group,
under layers of containment that a program cannot undo, set up by a trusted bootstrap in the
child before the program's first line:

- Limits (`setrlimit`): CPU seconds, address space (an allocation beyond it raises
  MemoryError), file size (RLIMIT_FSIZE, also bounding the captured stdout/stderr), open files,
  no core files, and the number of processes (RLIMIT_NPROC: no process or thread beyond those
  its user already runs plus `Limits.extra_processes`).
- A wall-clock limit enforced by the parent: at the limit the whole process group is killed
  (SIGKILL); it is killed again after every run, so nothing a program started outlives it.
- A scratch working directory (also HOME and TMPDIR), removed afterwards; a minimal environment
  (nothing of the parent's: no secrets); stdin is empty.
- No network: a new network namespace (`unshare(CLONE_NEWNET)`; without even a loopback
  interface, so 127.0.0.1 is unreachable). It needs root or unprivileged user namespaces (then
  `CLONE_NEWUSER | CLONE_NEWNET`); where the OS refuses both, the program still runs, sockets are
  refused by the audit hook below only, `Outcome.network_isolated` is False and a warning is
  logged once.
- Run by root, the program drops to the unprivileged user `nobody`, so the OS itself refuses
  writes outside the scratch directory and reads of other processes' /proc files, and
  RLIMIT_NPROC applies (it does not to root). Only where `nobody` can read the interpreter's
  library (an interpreter under /root, as pyenv installs it, is not): otherwise the program
  stays root, `Outcome.unprivileged` is False, a warning is logged once, and the audit hook and
  the process-group kill are what contain it.
- A Python audit hook (PEP 578; it cannot be removed) refuses: sockets; writing, creating,
  removing, renaming or re-permissioning anything outside the scratch directory; leaving it
  with chdir; reading another process's /proc entries; signals to other processes; fork, exec,
  spawn, subprocess and os.system; ctypes (and so any call into libc behind Python's back).
  A refused operation raises PermissionError in the program.

The OS layers hold against native code; the audit hook is the layer that holds where the OS
layers are unavailable (a non-root user without user namespaces).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Sequence

from absl import logging

NOBODY = 'nobody'
STATUSES = ('passed', 'failed', 'timeout')


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one program may use.

  Attributes:
    wall_seconds: wall-clock limit; the process group is killed at it.
    cpu_seconds: CPU-time limit (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later).
    memory_bytes: address-space limit (RLIMIT_AS).
    file_bytes: largest file the program may write (RLIMIT_FSIZE), stdout/stderr included.
    open_files: open file descriptors (RLIMIT_NOFILE).
    extra_processes: processes or threads the program may start (RLIMIT_NPROC headroom over
      what its user already runs; 0: none).
    output_chars: characters of stdout/stderr kept in the Outcome (the tail).
  """
  wall_seconds: float = 10.0
  cpu_seconds: int = 10
  memory_bytes: int = 2 << 30
  file_bytes: int = 16 << 20
  open_files: int = 64
  extra_processes: int = 0
  output_chars: int = 4000


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a program ended.

  Attributes:
    status: 'passed' (exit status 0), 'failed' (any other exit, a signal, a refused
      operation), or 'timeout' (killed at the wall-clock or CPU limit).
    reason: a short human-readable cause ('exit 1', 'wall-clock limit 10 s', ...).
    returncode: the process's exit status (negative: the signal that ended it).
    seconds: wall time.
    stdout, stderr: their tails (Limits.output_chars).
    network_isolated: whether the program ran in its own network namespace.
    unprivileged: whether it ran as an unprivileged user (not root).
  """
  status: str
  reason: str
  returncode: int | None
  seconds: float
  stdout: str
  stderr: str
  network_isolated: bool
  unprivileged: bool

  @property
  def passed(self) -> bool:
    """Whether the program exited with status 0 within its limits."""
    return self.status == 'passed'


# The trusted bootstrap, run by `python -I -c` in the child before the program. argv: the
# program's path, the settings as JSON. It reports on the status file descriptor whether the
# network namespace was made, then runs the program as __main__.
_BOOTSTRAP = r'''
import json, os, resource, sys
def _setup():
  settings = json.loads(sys.argv[2])
  scratch = os.path.realpath(settings['scratch'])
  for name, value in (('RLIMIT_CPU', (settings['cpu'], settings['cpu'] + 1)),
                      ('RLIMIT_AS', (settings['memory'],) * 2),
                      ('RLIMIT_FSIZE', (settings['fsize'],) * 2),
                      ('RLIMIT_NOFILE', (settings['nofile'],) * 2),
                      ('RLIMIT_CORE', (0, 0))):
    resource.setrlimit(getattr(resource, name), value)
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)
  isolated = libc.unshare(0x40000000) == 0  # CLONE_NEWNET
  if not isolated and os.getuid() != 0:
    isolated = libc.unshare(0x10000000 | 0x40000000) == 0  # CLONE_NEWUSER | CLONE_NEWNET
  del libc, ctypes
  for name in [m for m in sys.modules if m == 'ctypes' or m.startswith(('ctypes.', '_ctypes'))]:
    del sys.modules[name]
  if os.getuid() == 0 and settings['uid'] is not None:
    os.setgroups([])
    os.setgid(settings['gid'])
    os.setuid(settings['uid'])
  uid = os.getuid()
  running = 0
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        running += os.stat('/proc/' + entry).st_uid == uid
      except OSError:
        pass
  if uid != 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (running + settings['nproc'],) * 2)
  os.write(settings['status_fd'], b'1' if isolated else b'0')
  os.close(settings['status_fd'])
  os.chdir(scratch)
  own = '/proc/%d' % os.getpid()

  def inside(path):
    if isinstance(path, int):
      return True  # An fd the program already holds.
    path = os.path.realpath(os.fsdecode(path))
    return path == scratch or path.startswith(scratch + os.sep)

  def proc_of_other(path):
    if isinstance(path, int):
      return False
    path = os.path.realpath(os.fsdecode(path))
    if not path.startswith('/proc/'):
      return False
    head = path.split('/')[2]
    return head.isdigit() and path != own and not path.startswith(own + '/')

  refused = ('socket.', 'os.fork', 'os.forkpty', 'os.exec', 'os.spawn', 'os.posix_spawn',
             'os.system', 'subprocess.', 'pty.', 'os.kill', 'os.killpg', 'signal.pthread_kill',
             'ctypes.', 'os.setuid', 'os.setgid', 'os.setsid', 'resource.setrlimit',
             'resource.prlimit', 'sys.remote_exec', 'os.startfile', 'webbrowser.')
  writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
  paths_changed = {'os.remove': 1, 'os.rmdir': 1, 'os.mkdir': 1, 'os.chmod': 1, 'os.chown': 1,
                   'os.truncate': 1, 'os.utime': 1, 'os.rename': 2, 'os.link': 2,
                   'os.symlink': 2, 'shutil.rmtree': 1, 'shutil.move': 2, 'shutil.copyfile': 2,
                   'os.chdir': 1, 'os.mkfifo': 1, 'os.mknod': 1, 'os.setxattr': 1,
                   'os.removexattr': 1, 'os.chflags': 1, 'os.lchflags': 1}

  def hook(event, args):
    if event == 'import' and args[0].split('.')[0] in (
        'ctypes', '_ctypes', '_posixsubprocess', 'cffi', '_xxsubinterpreters'):
      raise PermissionError(f'sandbox: importing {args[0]} is not allowed')
    if event.startswith(refused):
      raise PermissionError(f'sandbox: {event} is not allowed')
    if event == 'open':
      path, mode, flags = args
      writing = (mode is not None and any(c in str(mode) for c in 'wax+')) or (
          mode is None and isinstance(flags, int) and flags & writes)
      if writing and not inside(path):
        raise PermissionError(f'sandbox: writing {path!r} outside the scratch directory')
      if proc_of_other(path):
        raise PermissionError(f'sandbox: reading {path!r} is not allowed')
    elif event in paths_changed:
      for path in args[:paths_changed[event]]:
        if path is not None and not inside(path):
          raise PermissionError(f'sandbox: {event} {path!r} outside the scratch directory')
    elif event in ('os.listdir', 'os.scandir') and args and proc_of_other(args[0] or '.'):
      raise PermissionError(f'sandbox: listing {args[0]!r} is not allowed')
  sys.addaudithook(hook)
  return sys.argv[1]

_path = _setup()
del _setup
sys.argv = [_path]
with open(_path, encoding='utf-8') as _f:
  _code = compile(_f.read(), _path, 'exec')
del _f, _path
exec(_code, {'__name__': '__main__', '__builtins__': __builtins__})
'''

_warned = {'network': threading.Event(), 'root': threading.Event()}


def _reachable_by_others(directory: str) -> bool:
  """Whether a user with no rights of its own can list `directory` and open what is in it."""
  path = os.path.realpath(directory)
  parts = path.split(os.sep)
  for i in range(1, len(parts) + 1):
    try:
      mode = os.stat(os.sep + os.path.join(*parts[1:i]) if i > 1 else os.sep).st_mode
    except OSError:
      return False
    if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
      return False
  return True


@functools.lru_cache(maxsize=1)
def _unprivileged_ids() -> tuple[int, int] | None:
  """(uid, gid) of `nobody` where the parent is root and `nobody` can read the interpreter's
  library; None otherwise."""
  if os.getuid() != 0:
    return None
  try:
    entry = pwd.getpwnam(NOBODY)
  except KeyError:
    return None
  paths = {sysconfig.get_path(name) for name in ('stdlib', 'platstdlib', 'purelib', 'platlib')}
  paths.add(os.path.join(sysconfig.get_path('platstdlib'), 'lib-dynload'))
  if not all(_reachable_by_others(p) for p in paths if p and os.path.isdir(p)):
    return None
  return entry.pw_uid, entry.pw_gid


def _warn_once(key: str, message: str) -> None:
  if not _warned[key].is_set():
    _warned[key].set()
    logging.warning(message)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(path: str, chars: int) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4 * chars))
      return f.read().decode('utf-8', 'replace')[-chars:]
  except OSError:
    return ''


def _remove(scratch: str) -> None:
  def writable(function, path, _):
    try:
      os.chmod(os.path.dirname(path), 0o700)
      os.chmod(path, 0o700)
      function(path)
    except OSError:
      pass
  shutil.rmtree(scratch, onerror=writable)


def run(program: str, limits: Limits = Limits()) -> Outcome:
  """Runs one untrusted Python program in the sandbox (module docstring); returns how it ended.

  Args:
    program: Python source, run as __main__ in a scratch directory.
    limits: what it may use.
  """
  scratch = tempfile.mkdtemp(prefix='calm_sandbox_')
  start = time.perf_counter()
  status_read, status_write = os.pipe()
  process = None
  try:
    path = os.path.join(scratch, 'program.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(program)
    ids = _unprivileged_ids()
    if ids is None and os.getuid() == 0:
      _warn_once('root', 'sandbox: programs run as root (the user nobody cannot read this '
                 "interpreter's library): the audit hook and process-group kill contain them.")
    if ids is not None:
      os.chown(scratch, *ids)
      os.chown(path, *ids)
    os.chmod(scratch, 0o700)
    settings = dict(scratch=scratch, cpu=int(limits.cpu_seconds), memory=int(limits.memory_bytes),
                    fsize=int(limits.file_bytes), nofile=int(limits.open_files),
                    nproc=int(limits.extra_processes), status_fd=status_write,
                    uid=ids[0] if ids else None, gid=ids[1] if ids else None)
    env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': scratch, 'TMPDIR': scratch,
           'PYTHONHASHSEED': '0', 'PYTHONDONTWRITEBYTECODE': '1'}
    out_path, err_path = os.path.join(scratch, '.stdout'), os.path.join(scratch, '.stderr')
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
      process = subprocess.Popen(
          [sys.executable, '-I', '-B', '-c', _BOOTSTRAP, path, json.dumps(settings)],
          stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch, env=env,
          start_new_session=True, pass_fds=(status_write,), close_fds=True)
    os.close(status_write)
    status_write = -1
    try:
      returncode = process.wait(timeout=limits.wall_seconds)
      timed_out = False
    except subprocess.TimeoutExpired:
      _kill_group(process.pid)
      returncode = process.wait()
      timed_out = True
    _kill_group(process.pid)  # Whatever it started, it does not outlive it.
    seconds = time.perf_counter() - start
    isolated = os.read(status_read, 1) == b'1'
    if not isolated:
      _warn_once('network', 'sandbox: no network namespace on this machine (needs root or '
                 'user namespaces): the audit hook alone keeps programs off the network.')
    if timed_out:
      status, reason = 'timeout', f'wall-clock limit {limits.wall_seconds:g} s'
    elif returncode == 0:
      status, reason = 'passed', 'exit 0'
    elif returncode == -signal.SIGXCPU:
      status, reason = 'timeout', f'CPU limit {limits.cpu_seconds} s'
    elif returncode < 0:
      status, reason = 'failed', f'signal {signal.Signals(-returncode).name}'
    else:
      status, reason = 'failed', f'exit {returncode}'
    return Outcome(status=status, reason=reason, returncode=returncode, seconds=seconds,
                   stdout=_tail(out_path, limits.output_chars),
                   stderr=_tail(err_path, limits.output_chars), network_isolated=isolated,
                   unprivileged=os.getuid() != 0 or ids is not None)
  finally:
    if process is not None and process.poll() is None:
      _kill_group(process.pid)
      process.wait()
    for fd in (status_read, status_write):
      if fd >= 0:
        os.close(fd)
    _remove(scratch)


def run_many(programs: Sequence[str], limits: Limits = Limits(),
             workers: int | None = None) -> list[Outcome]:
  """Runs every program in its own sandbox, at most `workers` at a time (default: the CPU
  count); the outcomes in the programs' order."""
  workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda p: run(p, limits), programs))
