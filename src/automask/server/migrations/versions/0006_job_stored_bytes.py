"""Each v2 job records the bytes its stored request holds (`jobs.stored_bytes`: the request JSON and the upload), so
a submit can check the bytes unfinished jobs hold in the database (`AUTOMASK_SERVER_MAX_QUEUED_BYTES[_PER_KEY]`) by
adding up a small column: measuring the requests themselves read every queued image (seconds per submit, under the
write lock). The jobs unfinished at the upgrade are measured here, once (they counted as nothing, so a key's queue
full of uploads then could take as much again); finished ones hold no request and stay NULL.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("stored_bytes", sa.Integer))  # a nullable column: a plain ALTER TABLE on both
    # bytes, not characters: the JSON as UTF-8 (SQLite's length() of a BLOB, PostgreSQL's octet_length)
    request = "length(CAST(request AS BLOB))" if op.get_bind().dialect.name == "sqlite" else "octet_length(request)"
    op.execute(
        f"UPDATE jobs SET stored_bytes = coalesce({request}, 0) + coalesce(length(upload), 0) "
        "WHERE status IN ('QUEUED', 'PROCESSING')"
    )
