"""Console logging of the entry points: our progress lines at INFO, libraries' chatter hidden,
and no error lines from a healthy run.

A healthy CPU run used to print error-level lines that were not errors: TensorFlow's failed
CUDA probe (`failed call to cuInit`), libtpu's start-up on a host without TPUs (JAX tries its
TPU backend whenever libtpu is installed, as with the test extra) and gin's search for each
included file under every search path (`Path not found`). `quiet_startup` removes the first
two at their source and the logging filter drops gin's probes; real warnings and errors still
show.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

# Libraries that log every file operation at INFO; their warnings and errors still show.
_CHATTY = ('/orbax/', '/jax/_src/', '/tensorflow/', '/tensorstore/')
# gin looks for an included file under each search path in turn; its package-resource reader
# logs these for each path that does not hold the file. A file found nowhere is gin's IOError.
_GIN_PROBES = ('system_path_file_exists:%s', 'Path not found: %s')


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.msg in _GIN_PROBES and record.pathname.endswith(
        os.path.join('gin', 'resource_reader.py')):
      return False
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _CHATTY)


def setup_console_logging() -> None:
  """Shows INFO from calm_jax and WARNING+ from chatty libraries on the absl handler."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def quiet_startup() -> None:
  """Keeps TensorFlow and JAX from logging errors about accelerators this host does not have.

  For entry points only, before TensorFlow is imported and before JAX starts a backend; each
  setting applies only where the user has set nothing:
    - no NVIDIA GPU visible: TF_CPP_MIN_LOG_LEVEL=3. TensorFlow (the input pipeline, on the
      CPU) probes CUDA anyway and logs the failure as an error. Level 3 keeps only FATAL lines
      of TensorFlow's C++ logging (and of XLA's in jaxlib, which reads the same variable);
      their errors that matter reach Python as exceptions. TF_CPP_MIN_LOG_LEVEL=0 shows all.
      With a GPU: TF_CPP_MIN_LOG_LEVEL=1 (INFO hidden), JAX's own default.
    - no TPU and no GPU: JAX's platform is 'cpu' (JAX_PLATFORMS), so JAX does not start
      libtpu, which logs errors when it finds no TPU. JAX_FORCE_TPU_INIT keeps the TPU.
  """
  # Read before importing JAX, which sets its own default of 1.
  tf_level_set = 'TF_CPP_MIN_LOG_LEVEL' in os.environ
  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # What JAX itself reads to find TPUs and GPUs.
  nvidia = hardware_utils.has_visible_nvidia_gpu()
  if not tf_level_set:
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '1' if nvidia else '3'
  accelerator = (nvidia or hardware_utils.num_available_amd_gpus(stop_at=1) > 0
                 or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0)
  if not (accelerator or os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ):
    import jax
    jax.config.update('jax_platforms', 'cpu')
