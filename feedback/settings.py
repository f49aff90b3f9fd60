"""Settings owned by the feedback package: the `[store]` section.

    [store]
    url = "postgresql+psycopg://tunewheel@db/tunewheel"    # default: SQLite (WAL) in the data dir
    scrub_at_write = true                                  # PII never reaches the turn log

    store = StoreSettings(); store.url_for(data_dir)        # the SQLAlchemy URL to open

The top-level settings (serve/settings.py) compose this section with the others; functions of
this package take this section, or the URL it gives, never the whole settings object.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

SQLITE_FILE = "tunewheel.db"


class StoreSettings(BaseModel):
    """Where turns, ratings, snapshots' lineage and the adapter registry are stored."""

    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data dir>/tunewheel.db. "
                                              "Postgres: postgresql+psycopg://user@host/db.")
    scrub_at_write: bool = Field(False, description="Scrub PII (feedback/pii.py: e-mails, phone numbers, cards, IBANs, IP "
                                                    "addresses, national ids) from every turn, correction and comment before "
                                                    "it is stored, not only when curating. Costs gateway CPU per turn (the "
                                                    "first one waits a few seconds for presidio to load).")

    def url_for(self, data_dir: Path) -> str:
        """The URL to open: the configured one, or the SQLite file in `data_dir`."""
        return self.url or f"sqlite:///{(Path(data_dir) / SQLITE_FILE).resolve()}"
