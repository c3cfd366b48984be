"""The error type for user mistakes: shown as one line, never a traceback."""


class UserError(ValueError):
  """Bad input or flags. The message names the value received and the fix."""
