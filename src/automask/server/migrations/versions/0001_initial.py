"""The schema of release 0.1 (keys, holds, jobs), created only where missing.

Release 0.1 created these tables itself and wrote no version table; on such a database this revision finds them
all and changes nothing, so `automask db migrate` upgrades it in place.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "keys" not in existing:
        op.create_table(
            "keys",
            sa.Column("id", sa.String, primary_key=True),
            sa.Column("name", sa.String, nullable=False, server_default=""),
            sa.Column("secret_hash", sa.String, nullable=False),
            sa.Column("credits", sa.Integer, sa.CheckConstraint("credits IS NULL OR credits >= 0")),
            sa.Column("rate_limit", sa.Integer, sa.CheckConstraint("rate_limit IS NULL OR rate_limit >= 1")),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("disabled_at", sa.Float),
        )
    if "holds" not in existing:
        op.create_table(
            "holds",
            sa.Column("id", sa.String, primary_key=True),
            sa.Column("key_id", sa.String, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
        )
    if "jobs" not in existing:
        op.create_table(
            "jobs",
            sa.Column("id", sa.String, primary_key=True),
            sa.Column("key_id", sa.String),
            sa.Column("status", sa.String, nullable=False),
            sa.Column("request", sa.Text),
            sa.Column("upload", sa.LargeBinary),
            sa.Column("base64", sa.Integer, nullable=False, server_default="0"),
            sa.Column("error", sa.Text),
            sa.Column("metadata", sa.Text),
            sa.Column("result_path", sa.Text),
            sa.Column("inference_time", sa.Float),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float),
            sa.Column("finished_at", sa.Float),
        )
        op.create_index("jobs_by_status", "jobs", ["status", "created_at"])
