"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback."""


class UserError(Exception):
    """A mistake in the user's input, flags or files. The message is the whole story."""


class InputError(UserError):
    """A bad record in an input file: `path:line: field: what is wrong`."""

    def __init__(self, path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


class StageNotBuilt(UserError):
    """Raised by a stage whose issue has not landed yet; it must never pretend to succeed."""
