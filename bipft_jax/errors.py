"""The one exception type for bad user input (configs, data files, checkpoints, CLI arguments).

The CLI turns it into a single `error: ...` line and exit code 2.
"""


class UserError(Exception):
  """Bad input from the user; the message names the problem and what to do."""
