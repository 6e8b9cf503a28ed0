"""The one exception type for bad user input (files, configs, checkpoints)."""


class UserError(ValueError):
  """Input the user can fix; the message is one line naming the file and the problem."""


def root_cause(error: BaseException) -> BaseException:
  """The innermost error behind `error`, down its chain of causes and contexts."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  return error


class EmptySplit(UserError):
  """A split that exists and lists no images: nothing to train on or score."""


class Diverged(UserError):
  """Training met a NaN or infinite loss: the same config and data would meet it again."""
