"""corrections, deletion records and the store's secret

Revision ID: 0005
Revises: 0004

Adds the correction a rating may carry (`feedback.correction`, every one given, and
`turn.correction`, the current one next to `turn.rating`), the `deletion` table (what
`tunewheel data forget` removed: counts and hashes, never the content) and `store_secret`
(the held-out split's salt, made once per store). Existing rows get NULL corrections.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:  # batch mode: SQLite cannot ALTER much in place
        batch.add_column(sa.Column("correction", sa.Text(), nullable=True))
    with op.batch_alter_table("turn") as batch:
        batch.add_column(sa.Column("correction", sa.Text(), nullable=True))
    op.create_table(
        "deletion",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("target_hash", sa.String(64), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("ratings", sa.Integer(), nullable=False),
        sa.Column("corrections", sa.Integer(), nullable=False),
        sa.Column("snapshots", sa.JSON(), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=True),
    )
    op.create_table(
        "store_secret",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("store_secret")
    op.drop_table("deletion")
    with op.batch_alter_table("turn") as batch:
        batch.drop_column("correction")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("correction")
