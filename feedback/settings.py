"""Settings owned by the feedback package: the `[store]` section.

    [store]
    url = "postgresql+psycopg://tunewheel@db/tunewheel"    # default: SQLite (WAL) in the data dir
    scrub_at_write = true                                  # PII never reaches the turn log

    [store.spool]                                           # answered turns on local disk first
    max_bytes = 268435456                                   # beyond it new chat requests get 503

    store = StoreSettings(); store.url_for(data_dir)        # the SQLAlchemy URL to open
    store.spool.dir_for(data_dir)                           # where the turn spool lives

The top-level settings (serve/settings.py) compose this section with the others; functions of
this package take this section, or the URL it gives, never the whole settings object.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

SQLITE_FILE = "tunewheel.db"
SPOOL_DIR = "spool"


class SpoolSettings(BaseModel):
    """The turn spool (feedback/spool.py): every answered turn is fsync'd here before the client
    gets the end of its answer, then written to the database by the turn writer."""

    dir: Path | None = Field(None, description="Folder of the spool; default <data dir>/spool. Local or a volume that "
                                               "outlives the process (each gateway process holds a lane of its own).")
    max_bytes: int = Field(256 << 20, gt=0, description="Turns not yet in the database, in bytes. While the spool holds "
                                                       "this much, new chat requests get 503 with Retry-After.")
    segment_bytes: int = Field(4 << 20, gt=0, description="Size at which a spool file is closed and a new one begun; "
                                                         "a closed file is deleted once all its turns are in the database.")
    drain_timeout_s: float = Field(20.0, ge=0, description="On shutdown, how long the writer keeps writing spooled turns "
                                                           "to the database; what is left stays in the spool for the next start.")

    def dir_for(self, data_dir: Path) -> Path:
        """The spool folder: the configured one, or `spool` in `data_dir`."""
        return Path(self.dir) if self.dir is not None else Path(data_dir) / SPOOL_DIR


class StoreSettings(BaseModel):
    """Where turns, ratings, snapshots' lineage and the adapter registry are stored."""

    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data dir>/tunewheel.db. "
                                              "Postgres: postgresql+psycopg://user@host/db.")
    spool: SpoolSettings = Field(default_factory=SpoolSettings, description="The turn spool before the database.")
    scrub_at_write: bool = Field(False, description="Scrub PII (feedback/pii.py: e-mails, phone numbers, cards, IBANs, IP "
                                                    "addresses, national ids) from every turn, correction and comment before "
                                                    "it is stored, not only when curating. Costs gateway CPU per turn (the "
                                                    "first one waits a few seconds for presidio to load).")

    def url_for(self, data_dir: Path) -> str:
        """The URL to open: the configured one, or the SQLite file in `data_dir`."""
        return self.url or f"sqlite:///{(Path(data_dir) / SQLITE_FILE).resolve()}"
