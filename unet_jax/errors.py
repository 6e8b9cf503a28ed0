"""The one exception type for bad user input (files, configs, checkpoints)."""


class UserError(ValueError):
  """Input the user can fix; the message is one line naming the file and the problem."""
