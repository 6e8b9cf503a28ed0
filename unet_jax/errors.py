"""The exception types for bad user input (files, configs, checkpoints), and their wording."""


class UserError(ValueError):
  """Input the user can fix; the message is one line naming the file and the problem."""


def counted(count: int, noun: str) -> str:
  """"1 image", "3 images": `count` and the noun, plural unless it is 1."""
  return f"{count} {noun}{'' if count == 1 else 's'}"


def some_of(names: list[str], shown: int = 3) -> str:
  """The first `shown` of `names`, comma-separated, and "..." when there are more: for a
  message that names examples."""
  return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def root_cause(error: BaseException) -> BaseException:
  """The innermost error behind `error`, down its chain of causes and contexts."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  return error


class EmptySplit(UserError):
  """A split that exists and lists no images: nothing to train on or score."""


class Diverged(UserError):
  """Training met a NaN or infinite loss: the same config and data would meet it again."""
