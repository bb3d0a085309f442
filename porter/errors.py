"""One error type for everything a user can get wrong: one line, file:line, construct, rule."""

from __future__ import annotations


class PorterError(Exception):
    """A user-facing failure. ``str()`` is the single line the CLI prints (exit code 2)."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        construct: str | None = None,
        rule: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.construct = construct
        self.rule = rule
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        text = self.message
        if self.construct:
            text += f" in {self.construct}"
        if self.rule:
            text += f" (rule {self.rule})"
        return (where + text).replace("\n", " ")
