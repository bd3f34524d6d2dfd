"""The one error the DAG layer raises: a rejected job spec, naming what is wrong and where."""

from __future__ import annotations

from deepflow.openai_errors import format_loc

__all__ = ["DagError", "format_loc"]


class DagError(ValueError):
    """A job spec that cannot become a DAG. ``param`` points at the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_dag") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
