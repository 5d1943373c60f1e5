"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback."""

import errno


class UserError(Exception):
    """A mistake in the user's input, flags or files. The message is the whole story."""


class InputError(UserError):
    """A bad record in an input file: `path:line: field: what is wrong`."""

    def __init__(self, path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


# Write errors that mean "no room", not "bad data": the disk is full, the user's quota is used up,
# or the file hit the process's size limit (ulimit -f). Each is fixed outside the pipeline.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(UserError):
    """A write ran out of room. Outputs are left whole (the last record or the old file), so a rerun resumes."""

    def __init__(self, path, error: OSError):
        super().__init__(f"{path}: cannot write: {error.strerror or error}; the outputs written so far are valid: "
                         "free some space and rerun the same command to resume")
