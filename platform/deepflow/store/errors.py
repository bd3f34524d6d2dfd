"""Store errors that the API maps to HTTP statuses (404, 409)."""

from __future__ import annotations


class NotFound(LookupError):
    """No such row for this tenant (another tenant's rows are 'not found' too)."""

    def __init__(self, what: str, row_id: str) -> None:
        super().__init__(f"no {what} with id {row_id!r}")
        self.what = what
        self.row_id = row_id


class Conflict(ValueError):
    """The request contradicts the current state: an idempotency key reused with another
    body, or cancelling a finished job."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code
