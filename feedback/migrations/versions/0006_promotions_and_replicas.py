"""promotions and replicas: every promotion's request and outcome, and the gateway replicas' adapter leases

Revision ID: 0006
Revises: 0005

`promotion` (learn/promotion.py) records each promotion from request to outcome (promoted, fell
back because the engine would not load it, superseded by a newer move of prod, cancelled,
expired), so a CLI or learner in another process can hand the load to the gateways, and so
/metrics can count fallbacks. `serving_replica` (learn/replicas.py) holds each gateway replica's
heartbeat and the adapter versions it uses, so that no replica unloads a version another one is
still serving. New tables only; nothing existing changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "promotion",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("style", sa.String(length=200), nullable=True),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("expected", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_promotion_key", "promotion", ["key"])
    op.create_index("ix_promotion_state", "promotion", ["state"])
    op.create_table(
        "serving_replica",
        sa.Column("id", sa.String(length=200), primary_key=True),
        sa.Column("engine_url", sa.String(length=500), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_serving_replica_engine_url", "serving_replica", ["engine_url"])


def downgrade() -> None:
    op.drop_index("ix_serving_replica_engine_url", table_name="serving_replica")
    op.drop_table("serving_replica")
    op.drop_index("ix_promotion_state", table_name="promotion")
    op.drop_index("ix_promotion_key", table_name="promotion")
    op.drop_table("promotion")
