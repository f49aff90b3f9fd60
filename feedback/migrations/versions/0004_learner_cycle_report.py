"""learner_cycle: the rest of a cycle's report, so the row is the one record of a cycle

Revision ID: 0004
Revises: 0003

Adds the snapshot's version, the gate's decision, the training metrics and the seconds each
stage took (learn/cycle.py `LearnerCycle`); before this a `CycleReport` object carried them
beside the row. Existing columns keep their names and meaning; old rows get NULLs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("learner_cycle") as batch:  # batch mode: SQLite cannot ALTER much in place
        batch.add_column(sa.Column("snapshot", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("gate", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("train_metrics", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("timings", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("learner_cycle") as batch:
        for column in ("timings", "train_metrics", "gate", "snapshot"):
            batch.drop_column(column)
