"""Alembic environment: runs on the connection `edgewise.server._schema` hands it (never on
a URL of its own), with the server's models as the target metadata."""

from alembic import context

from edgewise.server._schema import target_metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=target_metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
