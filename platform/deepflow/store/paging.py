"""OpenAI-style cursor pages of a tenant's rows: ``after`` is the last id of the previous page,
rows ordered by (created_at, id), so a page holds whatever was inserted meanwhile."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from deepflow.store.errors import NotFound


def page_after(
    session: Session,
    stmt: Select[Any],
    model: Any,
    tenant_id: str,
    after: str | None,
    limit: int,
    newest_first: bool = True,
) -> tuple[list[Any], bool]:
    """One page of ``stmt`` (rows of ``model``, already filtered), and whether more follow."""
    if after is not None:
        cursor = session.execute(
            select(model.created_at, model.id).where(
                model.id == after, model.tenant_id == tenant_id
            )
        ).first()
        if cursor is None:
            raise NotFound(model.__tablename__.removesuffix("s"), after)
        if newest_first:
            stmt = stmt.where(
                or_(
                    model.created_at < cursor.created_at,
                    and_(model.created_at == cursor.created_at, model.id < cursor.id),
                )
            )
        else:
            stmt = stmt.where(
                or_(
                    model.created_at > cursor.created_at,
                    and_(model.created_at == cursor.created_at, model.id > cursor.id),
                )
            )
    if newest_first:
        stmt = stmt.order_by(model.created_at.desc(), model.id.desc())
    else:
        stmt = stmt.order_by(model.created_at, model.id)
    rows = list(session.execute(stmt.limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit
