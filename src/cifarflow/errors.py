"""User-fixable errors: one exception type whose message names the problem and the fix."""

from __future__ import annotations


class CifarflowError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits with status 2.

    Args:
        problem: what is wrong, naming the file, parameter or value.
        fix: how to fix it, as an instruction.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = " ".join(str(problem).split())  # always one line, whatever was quoted
        self.fix = " ".join(str(fix).split())
        super().__init__(f"{self.problem} ({self.fix})")
