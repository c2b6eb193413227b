"""SQLite: incremental auto-vacuum, so that the file shrinks again once results expire (the sweeper gives the free
pages back, `Store.reclaim_space`); before, a burst of results left the file at its largest size for good.

The mode takes effect on a file only when it is rewritten: `automask db migrate` runs one VACUUM after this
revision's transaction (`migrations._vacuum`). A file created since has it from the start. PostgreSQL: nothing.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA auto_vacuum=INCREMENTAL")
