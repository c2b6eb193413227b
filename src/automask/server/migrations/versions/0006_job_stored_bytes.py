"""Each v2 job records the bytes its stored request holds (`jobs.stored_bytes`: the request JSON and the upload), so
a submit can check the bytes unfinished jobs hold in the database (`AUTOMASK_SERVER_MAX_QUEUED_BYTES[_PER_KEY]`) by
adding up a small column: measuring the requests themselves read every queued image (seconds per submit, under the
write lock). NULL in rows written before: counted as nothing.

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
