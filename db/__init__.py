"""The system of record: SQLAlchemy models, sessions and repository functions (sqlalchemy only)."""
