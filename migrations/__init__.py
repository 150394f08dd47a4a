"""Alembic migrations; `diffbatch db upgrade` runs them (see db/migrate.py)."""
