"""Rows of uploaded files; their content is kept by ``deepflow.files``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from deepflow.store.errors import NotFound
from deepflow.store.orm import File
from deepflow.store.paging import page_after


def add_file(
    session: Session,
    file_id: str,
    tenant_id: str,
    purpose: str,
    filename: str,
    size: int,
    sha256: str,
    lines: int,
) -> File:
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename,
        bytes=size,
        sha256=sha256,
        lines=lines,
    )
    session.add(row)
    session.flush()
    return row


def read_file(session: Session, tenant_id: str, file_id: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("file", file_id)
    return row


def delete_file(session: Session, tenant_id: str, file_id: str) -> File:
    row = read_file(session, tenant_id, file_id)
    session.delete(row)
    session.flush()
    return row


@dataclass
class FilePage:
    files: list[File]
    has_more: bool


def list_files(
    session: Session,
    tenant_id: str,
    *,
    purpose: str | None = None,
    limit: int = 100,
    after: str | None = None,
    newest_first: bool = True,
) -> FilePage:
    """One page of a tenant's files; ``after`` is the last id of the previous page."""
    stmt = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    rows, has_more = page_after(session, stmt, File, tenant_id, after, limit, newest_first)
    return FilePage(rows, has_more)
