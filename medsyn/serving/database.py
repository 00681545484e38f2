"""The service's records: jobs, their images, API keys and an audit trail, in SQLite or PostgreSQL.

The database is the job queue: a job is written before the client hears its id, and the workers read their work
from it, so a restart finds every job that was accepted. The schema is created and upgraded by alembic
(``migrations/``), never by ``create_all``, so a deployed PostgreSQL database follows medsyn's releases.
"""

from __future__ import annotations

import datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def as_utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """A stored time as an aware UTC time (SQLite gives them back without a zone)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=datetime.UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class OutputFormat(StrEnum):
    PNG = "png"
    NPZ = "npz"
    DICOM = "dicom"


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the key: keys are 256 random bits, so a plain hash cannot be reversed by search."""
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    """An admin key sees and cancels every caller's jobs; another key only its own."""
    requests_per_minute: Mapped[int] = mapped_column(Integer)
    images_per_day: Mapped[int] = mapped_column(Integer)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    class_label: Mapped[int | None] = mapped_column(Integer, nullable=True)
    class_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    negative_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_inference_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_steps_each: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sampler: Mapped[str] = mapped_column(String(32))
    output_format: Mapped[str] = mapped_column(String(8))
    quality_check: Mapped[bool] = mapped_column(Boolean)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    started_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    generated: Mapped[int] = mapped_column(Integer, default=0)
    released: Mapped[int] = mapped_column(Integer, default=0)
    withheld: Mapped[int] = mapped_column(Integer, default=0)


class JobImage(Base):
    """One generated image: released (its file is in the storage folder) or withheld by the QA gate, with why.
    A withheld image's pixels are not kept: a near-copy of a training image is a patient's data."""

    __tablename__ = "job_images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_images_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    released: Mapped[bool] = mapped_column(Boolean)
    qa_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    nearest_training_distance: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class AuditEvent(Base):
    """Who asked for what, when, of which model version: one row per request that changed or read images."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the API) do not wait for the worker's writes
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def database_url(url_or_path: str) -> str:
    """A SQLAlchemy URL; a plain path means a SQLite file there. ``postgresql://`` uses psycopg 3."""
    if "://" not in url_or_path:
        return f"sqlite:///{Path(url_or_path).resolve()}"
    if url_or_path.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url_or_path.split("://", 1)[1]
    return url_or_path


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (creating it in an empty database)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url_or_path: str) -> sessionmaker:
    """Connect, migrate, and return a session factory. Errors name the URL (without its password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    url = database_url(url_or_path)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        upgrade(engine)
    except OperationalError as error:
        shown = make_url(url).render_as_string(hide_password=True)
        raise ValueError(f"--database {shown}: cannot connect or migrate ({error.orig})") from None
    return sessionmaker(engine, expire_on_commit=False)
