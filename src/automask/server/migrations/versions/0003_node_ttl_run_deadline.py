"""Each node says when it is to be taken for dead, each run when it can no longer be going.

`nodes.dead_after`: the seconds after its last heartbeat at which the node is dead, its own `node_ttl` (nodes set
differently no longer judge each other by their own setting). `jobs.run_deadline`: the time (the database's clock)
after which a run can no longer be going, set by the node that claims the job from its own timeout (a worker with
a longer `--timeout` than the API nodes keeps its long runs). NULL in rows written before: the reader's settings.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("dead_after", sa.Float))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run_deadline", sa.Float))
