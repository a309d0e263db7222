"""Alembic environment: the URL comes from the caller (service.db.upgrade) or, for the
``alembic`` command line, from LAYERTRACK_DATABASE_URL (default: the embedded SQLite file)."""

from alembic import context
from layertrack.service.models import Base
from sqlalchemy import engine_from_config, pool

config = context.config
target_metadata = Base.metadata

if not config.get_main_option("sqlalchemy.url"):
    from layertrack.service.settings import Settings

    config.set_main_option("sqlalchemy.url", Settings().db_url.replace("%", "%%"))


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
