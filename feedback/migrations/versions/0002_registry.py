"""The adapter registry's tables: versions, the prod pointers, the pointer history.

Mirrors learn/registry.py (AdapterVersion, AliasPointer, AliasHistory); applied by
`feedback.db.make_db` (alembic upgrade head). Written out with op.create_table so that
the migration never depends on the models as they change later.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapterversion",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("style", sa.String(length=200), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("parent", sa.String(length=200), nullable=True),
        sa.Column("snapshot_hash", sa.String(length=128), nullable=True),
        sa.Column("train_config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("gate", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_adapterversion_kind", "adapterversion", ["kind"])
    op.create_table(
        "aliaspointer",
        sa.Column("key", sa.String(length=200), primary_key=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("style", sa.String(length=200), nullable=True),
        sa.Column("version", sa.String(length=200), nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "aliashistory",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=True),
        sa.Column("previous", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_aliashistory_key", "aliashistory", ["key"])


def downgrade() -> None:
    op.drop_index("ix_aliashistory_key", table_name="aliashistory")
    op.drop_table("aliashistory")
    op.drop_table("aliaspointer")
    op.drop_index("ix_adapterversion_kind", table_name="adapterversion")
    op.drop_table("adapterversion")
