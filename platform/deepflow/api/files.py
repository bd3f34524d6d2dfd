"""The Files API (``/v1/files``), OpenAI's shape: upload (multipart ``file`` and ``purpose``),
list, read, delete and content. A JSONL file is checked line by line against its purpose
before anything is stored; a refusal names the line. Uploads are bounded by the API's body
limit (DEEPFLOW_MAX_BODY_BYTES)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from deepflow import files
from deepflow.api.deps import DB, CurrentTenant
from deepflow.openai_errors import OpenAIError
from deepflow.store import Database
from deepflow.store import files as file_rows
from deepflow.store.orm import File as FileRow
from deepflow.store.types import new_id

router = APIRouter(prefix="/v1/files", tags=["files"])


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    """Unix seconds, as OpenAI's."""
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, row: FileRow) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=_unix(row.created_at),
            filename=row.filename,
            purpose=row.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _clean_name(filename: str | None) -> str:
    """The upload's name without a folder part or control characters (NUL cannot be stored)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:255]
    return name or "file.jsonl"


def _unix(t: datetime) -> int:
    return int(t.timestamp())


@router.post("", response_model=FileObject)
async def upload_file(
    request: Request,
    tenant: CurrentTenant,
    db: DB,
    file: Annotated[UploadFile, File(description="a JSONL file")],
    purpose: Annotated[str, Form(description="fine-tune or batch")],
) -> FileObject:
    """Store a file for ``purpose`` once every line suits it; 400 naming the line if not."""
    if purpose not in files.UPLOADABLE:
        raise OpenAIError(
            400,
            f"purpose {purpose!r} is not one of {', '.join(files.UPLOADABLE)}",
            param="purpose",
            code="invalid_purpose",
        )
    data = await file.read()
    # The check, the fsync and the insert block: off the event loop the gateway shares.
    home = request.app.state.settings.home
    return await asyncio.to_thread(
        _store, db, home, tenant.id, purpose, _clean_name(file.filename), data
    )


def _store(
    db: Database, home: Path, tenant_id: str, purpose: str, name: str, data: bytes
) -> FileObject:
    try:
        lines = files.check(purpose, data)
    except files.InvalidFile as exc:
        raise OpenAIError(400, f"{name}: {exc}", param="file", code="invalid_file") from None
    file_id = new_id("file")
    sha256 = files.save(home, tenant_id, file_id, data)
    try:
        with db.transaction() as session:
            row = file_rows.add_file(
                session, file_id, tenant_id, purpose, name, len(data), sha256, lines
            )
            return FileObject.of(row)
    except BaseException:
        files.remove(home, tenant_id, file_id)  # no row, no content
        raise


@router.get("", response_model=FileList)
def list_files(
    tenant: CurrentTenant,
    db: DB,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """A tenant's files, newest first unless ``order=asc``; page with ``after``."""
    with db.transaction() as session:
        page = file_rows.list_files(
            session,
            tenant.id,
            purpose=purpose,
            limit=limit,
            after=after,
            newest_first=order == "desc",
        )
        data = [FileObject.of(f) for f in page.files]
    return FileList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def read_file(file_id: str, tenant: CurrentTenant, db: DB) -> FileObject:
    with db.transaction() as session:
        return FileObject.of(file_rows.read_file(session, tenant.id, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, request: Request, tenant: CurrentTenant, db: DB) -> FileDeleted:
    with db.transaction() as session:
        file_rows.delete_file(session, tenant.id, file_id)
    files.remove(request.app.state.settings.home, tenant.id, file_id)
    return FileDeleted(id=file_id)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(file_id: str, request: Request, tenant: CurrentTenant, db: DB) -> FileResponse:
    """The file's bytes, as uploaded."""
    with db.transaction() as session:
        row = file_rows.read_file(session, tenant.id, file_id)
        name = row.filename
    where = files.path(request.app.state.settings.home, tenant.id, file_id)
    return FileResponse(where, media_type="application/octet-stream", filename=name)
