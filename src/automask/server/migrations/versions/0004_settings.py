"""A `settings` table: what a deployment records about itself in its database, one value per name.

Its first row, `deployment`, says which kind of deployment the database serves: `single` (one server running its
models in-process) or `fleet` (API nodes with a broker, and Celery workers); see `automask.server.deployment`.
Absent in a database written before: the first server or worker to start records its own kind.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
