"""The one exception type for bad user input (files, configs, checkpoints)."""


class UserError(ValueError):
  """Input the user can fix; the message is one line naming the file and the problem."""


class Diverged(UserError):
  """Training met a NaN or infinite loss: the same config and data would meet it again."""
