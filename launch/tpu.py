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

The code lives in the package tpu_lib next to this file (see tpu_lib/__init__.py); this file
is the entry point and keeps its functions importable as before.
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts launch/ on sys.path; loaded by file path (as the tests do), it
# does not: either way tpu_lib is imported from this file's directory.
_LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _LAUNCH_DIR not in sys.path:
  sys.path.insert(0, _LAUNCH_DIR)

# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from tpu_lib.cli import build_parser, main, plan
from tpu_lib.gcloud import (NODE_FAILED, NODE_READY, QUEUED_FAILED, QUEUED_READY, REPO_ROOT,
                            SOURCE_EXCLUDES, create_plan, delete_plan, install_plan, logs_plan,
                            run_plan, ssh_step, stop_plan)
from tpu_lib.quoting import quote_value, shell_join, shell_quote
from tpu_lib.remote import (MULTIPROCESS_FLAGS, REMOTE_ARCHIVE, install_script, logs_script,
                            run_script, stop_script, with_multiprocess)
from tpu_lib.steps import LaunchError, Step, execute, print_plan, wait_until
from tpu_lib.validation import (ACCELERATOR_EXAMPLES, CHIP_COUNTED, CHIP_COUNTED_SIZES,
                                CORE_COUNTED, PATH_MACROS, RUNTIME_VERSIONS, check_job,
                                check_name, check_worker, check_zone, default_runtime_version,
                                gin_path_warnings, num_workers, parse_accelerator_type,
                                remote_path)
# pylint: enable=g-import-not-at-top,wrong-import-position,unused-import

if __name__ == '__main__':
  sys.exit(main())
