"""The one exception type for bad user input (files, configs, checkpoints)."""


class UserError(Exception):
  """Input the user can fix; the message is one line naming the file and the problem."""
