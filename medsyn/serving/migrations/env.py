"""alembic's entry point, run by ``medsyn.serving.database.upgrade`` on the connection it passes in."""

from alembic import context

from medsyn.serving.database import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
