"""Alembic migrations of the server's database (`edgewise server migrate`)."""
