"""a validation attempt's token on batches; a chunk's requeue delay

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 11:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.add_column(sa.Column('validation_token', sa.String(length=32), nullable=True))
    with op.batch_alter_table('chunks') as batch_op:
        batch_op.add_column(sa.Column('requeue_delay', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('chunks') as batch_op:
        batch_op.drop_column('requeue_delay')
    with op.batch_alter_table('batches') as batch_op:
        batch_op.drop_column('validation_token')
