"""Located config errors: Problem (YAML path + line), ConfigError, and YAML syntax errors."""

from __future__ import annotations

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by YAML path and line."""

    location: str  # "pools.web.backends[1].address"; "" for the whole file
    message: str
    line: int | None = None  # 1-based
    source: str | None = None  # file name, when known

    def __str__(self) -> str:
        parts = [str(p) for p in (self.source, self.line) if p not in (None, "")]
        head = ":".join(parts)
        return ": ".join(p for p in (head, self.location, self.message) if p)


class ConfigError(Exception):
    """Every problem found in a config, all at once, so one `balancer check` shows them all."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def reason(error: Exception) -> str:
    """The first line of what went wrong, for a message."""
    if isinstance(error, yaml.MarkedYAMLError):
        return error.problem or error.context or type(error).__name__
    return str(error).split("\n")[0] or type(error).__name__


def syntax_problem(error: yaml.YAMLError, text: str, source: str) -> Problem:
    """A YAML reader or parser error as a Problem with its line and column."""
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return Problem(
            "",
            f"invalid character {error.character!r} at column {column}: {error.reason}",
            line,
            source,
        )
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        what = error.problem or error.context or "invalid YAML"
        context = f" ({error.context})" if error.context and error.problem else ""
        if mark is not None:
            return Problem(
                "",
                f"YAML syntax error at column {mark.column + 1}: {what}{context}",
                mark.line + 1,
                source,
            )
        return Problem("", f"YAML syntax error: {what}{context}", None, source)
    return Problem("", f"YAML syntax error: {error}", None, source)
