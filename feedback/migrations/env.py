"""Alembic environment of the turn log (and of every table that shares its database).

Run through `feedback.db.make_db(url)` (or `feedback.db.migrate(engine)`), which builds the
Alembic config in code, hands over an open connection in `config.attributes["connection"]` and
holds a lock so two processes never migrate at once. There is no alembic.ini. To write a new
migration, copy 0001_turn_log.py: revision ids are plain strings ("0002", ...), and scripts use
`op.create_table`/`op.add_column` with explicit columns, never the SQLModel classes, so that an
old migration keeps meaning what it meant when it was written.
"""

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = context.config


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("tunewheel migrations run online only: use feedback.db.make_db(url)")

connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    with engine.connect() as conn:
        run_migrations(conn)
    engine.dispose()
