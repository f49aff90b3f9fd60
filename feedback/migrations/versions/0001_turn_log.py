"""Turn log: conversation, turn (one per answered request), feedback (every rating ever given).

Revision ID: 0001
Revises: (none)

Mirrors feedback/models.py as it was when written; tests/feedback/test_db.py compares the
migrated schema with the models so the two cannot drift apart unnoticed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversation",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_conversation_created_at", "conversation", ["created_at"])

    op.create_table(
        "turn",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("conversation_id", sa.String(64), sa.ForeignKey("conversation.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("adapter_version", sa.String(200), nullable=False),
        sa.Column("request_messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("raw_answer", sa.Text(), nullable=True),
        sa.Column("style", sa.String(200), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
        sa.Column("thread_hash", sa.String(64), nullable=False),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("rated_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_turn_created_at", "turn", ["created_at"])
    op.create_index("ix_turn_rated_at", "turn", ["rated_at"])
    op.create_index("ix_turn_thread_hash", "turn", ["thread_hash"])
    op.create_index("ix_turn_conv_seq", "turn", ["conversation_id", "seq"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.String(64), sa.ForeignKey("turn.id"), nullable=False),
        sa.Column("rating", sa.String(8), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_feedback_turn_id", "feedback", ["turn_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("turn")
    op.drop_table("conversation")
