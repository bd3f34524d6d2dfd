"""The one error the DAG layer raises: a rejected job spec, naming what is wrong and where."""

from __future__ import annotations


class DagError(ValueError):
    """A job spec that cannot become a DAG. ``param`` points at the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_dag") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def format_loc(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """Render a validation location as a parameter path: ``spec.tasks[0].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
