"""The modules of launch/tpu.py, the Cloud TPU launcher (run that file, not this package).

  steps       LaunchError, Step, and printing (--dry-run) or running a plan of steps
  quoting     shell quoting that keeps gin flags readable
  validation  checks of the flags: accelerator types, names, zones, workers, gs:// paths
  remote      the shell lines run on the workers (install, start a job, logs, stop)
  gcloud      the plan of each subcommand: the `gcloud compute tpus` commands
  cli         the argument parser and main

Standard library only.
"""
