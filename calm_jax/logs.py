"""Console logging of the entry points: our progress lines at INFO, libraries' chatter hidden."""

from __future__ import annotations

import logging as std_logging

from absl import logging

# Libraries that log every file operation at INFO; their warnings and errors still show.
_CHATTY = ('/orbax/', '/jax/_src/', '/tensorflow/', '/tensorstore/')


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _CHATTY)


def setup_console_logging() -> None:
  """Shows INFO from calm_jax and WARNING+ from chatty libraries on the absl handler."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
