"""The misuse catalogue's harness (tests/test_misuse.py, tests/test_misuse_cli.py): a case is a small
function that makes one mistake; running it must raise the expected qtrace error, whose message holds
every listed part and which points at the case's line marked `# <-` when the mistake has a user line."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import qtrace

MARK = "# <-"


@dataclass
class Case:
    name: str
    area: str
    run: Callable[[], Any]
    error: type
    parts: tuple[str, ...]
    located: bool
    at: Callable[..., Any]


def catalogue(cases: list[Case], area: str) -> Callable[..., Callable[[Callable[[], Any]], Callable[[], Any]]]:
    """`misuse = catalogue(CASES, "primitives")` gives the decorator that registers cases of one area."""

    def misuse(error: type, *parts: str, located: bool = True,
               at: Callable[..., Any] | None = None) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        """`at`: the function holding the marked line, when it is not the case itself."""

        def register(fn: Callable[[], Any]) -> Callable[[], Any]:
            cases.append(Case(fn.__name__, area, fn, error, parts, located, at or fn))
            return fn

        return register

    return misuse


def marked_line(fn: Callable[..., Any]) -> int:
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, text in enumerate(lines) if MARK in text]
    assert len(hits) == 1, f"{fn.__name__} needs exactly one line marked {MARK!r}"
    return hits[0]


def check_case(case: Case) -> None:
    with pytest.raises(qtrace.QtraceError) as info:
        case.run()
    error = info.value
    assert isinstance(error, case.error), f"{case.name}: {type(error).__name__}, expected {case.error.__name__}: {error}"
    text = str(error)
    for part in case.parts:
        assert part in text, f"{case.name}: {part!r} is not in the message:\n{text}"
    if case.located:
        assert error.location is not None, f"{case.name}: no user line in\n{text}"
        where = (os.path.abspath(error.location.file), error.location.line)
        assert where == (os.path.abspath(inspect.getsourcefile(case.at)), marked_line(case.at)), \
            f"{case.name}: located at {error.location}, expected the line marked {MARK}:\n{text}"
        assert f":{error.location.line} in " in text


def ids(case: Case) -> str:
    return f"{case.area}-{case.name}"
