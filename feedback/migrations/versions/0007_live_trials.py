"""live trials: the canary and probation state on the prod pointer, and why each move happened

Revision ID: 0007
Revises: 0006

`alias_pointer` gains the canary (version, share, start), the version on probation (since when,
and the version it replaced) and the last check of both (`live`, JSON), so that every gateway
replica routes the same share and a restarted learner picks a running canary up where it was
(learn/live.py). `alias_history.detail` and `promotion.detail` (JSON) hold who moved prod and
why: a canary's or probation's decision with its figures. Existing rows get NULLs: no trial.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aliaspointer") as batch:  # batch mode: SQLite cannot ALTER much in place
        batch.add_column(sa.Column("canary", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("canary_share", sa.Float(), nullable=True))
        batch.add_column(sa.Column("canary_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("probation", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("probation_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("probation_baseline", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("live", sa.JSON(), nullable=True))
    with op.batch_alter_table("aliashistory") as batch:
        batch.add_column(sa.Column("detail", sa.JSON(), nullable=True))
    with op.batch_alter_table("promotion") as batch:
        batch.add_column(sa.Column("detail", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("promotion") as batch:
        batch.drop_column("detail")
    with op.batch_alter_table("aliashistory") as batch:
        batch.drop_column("detail")
    with op.batch_alter_table("aliaspointer") as batch:
        for column in ("live", "probation_baseline", "probation_since", "probation", "canary_since", "canary_share", "canary"):
            batch.drop_column(column)
