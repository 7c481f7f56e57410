"""Where runs are stored: checked before any compute, locked while a new store is prepared, and never
shown with its credentials.

Plain URIs only (no MLflow here): :mod:`diito.tracking` opens the runs, this module makes sure the
store it opens them in can take them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from diito import files

SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


# The password of a URI's ``user:password@``, also as Hydra writes an override in a sweep's job names
# and override files, with ``:`` escaped (``http\://alice\:pw@host``).
_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*\\?://(?:\\[^:]|[^/:@\s\\])*\\?:)[^/@\s]+@")


def mask(text: str) -> str:
    """``text`` with credentials replaced by ``***``: the password of a URI's ``user:password@``
    (escaped or not), and the values of MLflow's secret environment variables."""
    text = _PASSWORD.sub(r"\1***@", str(text))
    for name in SECRET_VARIABLES:
        if os.environ.get(name):
            text = text.replace(os.environ[name], "***")
    return text


def mask_logs() -> None:
    """Mask every log record of this process before any handler sees it: this project's, MLflow's,
    and Hydra's own lines that repeat the command line (``#0 : ... tracking.uri=...``). A record
    factory, because Hydra replaces the handlers when it configures logging."""
    make = logging.getLogRecordFactory()
    if getattr(make, "masks", False):
        return

    def masked(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report, as without masking
            return record
        if mask(message) != message:
            record.msg, record.args = mask(message), None
        if record.exc_info:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        return record

    masked.masks = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked)


class StoreError(ValueError):
    """The tracking store cannot take the job's runs; the message says why and what to do."""


def check(uri: str, timeout: float) -> None:
    """Fail early when the store cannot work: an unknown scheme, a server that does not answer, a
    database that cannot be reached, opened, written or locked. Raises :class:`StoreError` naming
    the (masked) URI."""
    uri = uri or ""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in SCHEMES:
        raise StoreError(f"{mask(uri)!r} is not a tracking URI MLflow stores runs at ({', '.join(SCHEMES)})")
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)  # the health check needs no credentials (urllib cannot read them from a URL)
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        try:
            urllib.request.urlopen(parts._replace(netloc=host).geturl().rstrip("/") + "/health", timeout=timeout).close()
        except OSError as e:
            reason = getattr(e, "reason", e)
            raise StoreError(
                f"no MLflow server answers at {mask(uri)} ({reason}); start one (mlflow server) or use tracking=mlflow"
            ) from None
    if scheme in ("postgresql", "mysql", "mssql"):
        _check_database(uri, timeout)
    if scheme == "sqlite":
        _check_sqlite(uri, timeout)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not (uri or "").startswith("sqlite:///"):
        return None
    return Path(urllib.parse.urlsplit(uri).path.removeprefix("/"))


def is_new(uri: str | None) -> bool:
    """Whether the store is an SQLite file not created yet (MLflow creates it on first use)."""
    path = sqlite_file(uri or "")
    return path is not None and not path.exists()


def _check_sqlite(uri: str, timeout: float) -> None:
    """The database file, when it exists, is a writable SQLite database no other program holds
    locked for longer than ``timeout`` seconds (the jobs of a parallel sweep take short write locks
    in turn); its folder takes the journal SQLite writes beside it. Writes nothing: an absent file
    is left for MLflow to create."""
    path = sqlite_file(uri)
    if path.exists():
        if path.is_dir():
            raise StoreError(f"{uri} is not an SQLite database ({path} is a folder); set tracking.uri=sqlite:///<a file>")
        if problem := files.read_only(path):
            raise StoreError(f"{uri} is read-only ({problem}); make it writable or set tracking.uri=<another store>")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the database's folder {folder} ({e.strerror})") from None
    if problem := files.read_only(folder.absolute()):
        raise StoreError(f"the database's folder is not writable: {problem}")
    if not path.exists():
        return
    try:  # mode=rw: never creates a database
        with contextlib.closing(
            sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        ) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header: a database at all?
            db.execute("BEGIN IMMEDIATE")  # the write lock a job takes to log (waits out other jobs' short ones)
            db.execute("ROLLBACK")
    except sqlite3.DatabaseError as e:
        if e.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            raise StoreError(
                f"{uri} is locked by another program (still after tracking.timeout={timeout:g} s); "
                "end the program that holds it (an open sqlite3 session, a database browser) and run again"
            ) from None
        if e.sqlite_errorname in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            raise StoreError(
                f"{uri} is not an SQLite database ({path}: {e}); move that file away or set tracking.uri=<another store>"
            ) from None
        raise StoreError(f"{uri} cannot be opened ({e})") from None


def _check_database(uri: str, timeout: float) -> None:
    """Connect once: the database server answers, the database exists, its driver is installed."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": max(1, round(timeout))})
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise StoreError(
            f"{mask(uri)}: the database driver is not installed ({e}); for PostgreSQL: pip install 'diito[postgres]'"
        ) from None
    try:
        with engine.connect():
            pass
    except ImportError as e:
        raise StoreError(
            f"{mask(uri)}: the database driver is not installed ({e}); for PostgreSQL: pip install 'diito[postgres]'"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = mask(str(getattr(e, "orig", None) or e).strip().splitlines()[0])
        raise StoreError(f"cannot reach the tracking database {mask(uri)} ({reason})") from None
    finally:
        engine.dispose()


def lock(uri: str | None):
    """A lock that concurrent jobs take before touching a database store: the first access to a new
    database creates its schema, and jobs must not race to do that (on a fresh PostgreSQL store all
    but one would fail with duplicate tables) or to create the same experiment. A file beside a
    SQLite store; the database's own advisory lock for PostgreSQL and MySQL, which holds across
    machines."""
    if path := sqlite_file(uri):
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock")
    if uri and uri.startswith(("postgresql", "mysql")):
        return _advisory_lock(uri)
    return contextlib.nullcontext()


_ADVISORY_KEY = 0x646969746F  # "diito": the same lock for every job on a database


@contextlib.contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    postgres = uri.startswith("postgresql")
    take, release = (
        ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
        if postgres
        else ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)")
    )
    key = _ADVISORY_KEY if postgres else "diito-mlflow-store"
    engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as connection:  # a connection of its own, held while the store is prepared
            connection.execute(sqlalchemy.text(take), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(release), {"key": key})
    finally:
        engine.dispose()
