"""Alembic environment: the target is `core.db.Base.metadata`; the URL comes from the service settings."""

from __future__ import annotations

from alembic import context

import core.jobs.models  # noqa: F401  (registers the tables on the metadata)
from core.config import get_settings
from core.db import Base, UTCDateTime, make_engine


config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url


def render_item(type_: str, obj: object, _autogen_context: object) -> str | bool:
    """Migrations spell our UTC timestamp type as the plain column type it stores."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    """Emits SQL without a connection (`alembic upgrade --sql`)."""
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Applies migrations over a connection; SQLite gets batch mode for ALTERs."""
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            compare_type=True,
            render_as_batch=url.startswith("sqlite"),
            render_item=render_item,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
