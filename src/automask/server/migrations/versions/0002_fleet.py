"""Fleet-ready state: results in the database, jobs know their model and node, v1 holds expire, admin-set
balances stick, worker nodes announce themselves.

Results of completed jobs that release 0.1 kept as files are read into the `result` column (a file already gone
leaves the job without a result, as its expiry would have); the files are deleted once the migration has committed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float))
        batch.add_column(sa.Column("refundable", sa.Boolean, nullable=False, server_default=sa.true()))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result", sa.LargeBinary))
        batch.add_column(sa.Column("model", sa.String))
        batch.add_column(sa.Column("published_at", sa.Float))
        batch.add_column(sa.Column("node", sa.String))
    op.create_table(
        "nodes",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("models", sa.Text, nullable=False, server_default="[]"),
        sa.Column("default_model", sa.String),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    _move_result_files()


def _move_result_files() -> None:
    bind = op.get_bind()
    config = op.get_context().config
    done: list[Path] = config.attributes.setdefault("delete_after_commit", []) if config is not None else []
    jobs = sa.table("jobs", sa.column("id"), sa.column("result_path"), sa.column("result", sa.LargeBinary))
    rows = bind.execute(sa.select(jobs.c.id, jobs.c.result_path).where(jobs.c.result_path.is_not(None))).all()
    for job_id, path in rows:
        file = Path(path)
        data = file.read_bytes() if file.is_file() else None
        bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(result=data, result_path=None))
        if data is not None:
            done.append(file)
