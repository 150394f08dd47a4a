"""tenants and API keys (files and batches belong to a tenant; idempotency keys are per tenant);
chunk leases and failure counts; file expiry; validation attempts; request token budgets

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:10:44
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('max_queued_requests', sa.Integer(), nullable=True),
    sa.Column('max_queued_tokens', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('salt', sa.String(length=64), nullable=False),
    sa.Column('secret_hash', sa.String(length=128), nullable=False),
    sa.Column('admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('last_used_at', sa.BigInteger(), nullable=True),
    sa.Column('revoked_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=64), server_default='local', nullable=False))
        batch_op.add_column(sa.Column('validation_attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('output_expires_after_s', sa.Integer(), nullable=True))
        batch_op.drop_constraint(batch_op.f('uq_batches_idempotency_key'), type_='unique')
        batch_op.create_index(batch_op.f('ix_batches_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_batches_tenant_id'), ['tenant_id', 'idempotency_key'])

    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('leased_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('failures', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_chunks_worker'), ['worker'], unique=False)

    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=64), server_default='local', nullable=False))
        batch_op.add_column(sa.Column('line_count', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('expires_at', sa.BigInteger(), nullable=True))
        batch_op.drop_constraint(batch_op.f('uq_files_idempotency_key'), type_='unique')
        batch_op.create_index(batch_op.f('ix_files_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_files_tenant_id'), ['tenant_id', 'idempotency_key'])

    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_tokens', sa.Integer(), server_default='0', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_column('budget_tokens')

    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_files_tenant_id'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_files_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_files_expires_at'))
        batch_op.create_unique_constraint(batch_op.f('uq_files_idempotency_key'), ['idempotency_key'])
        batch_op.drop_column('expires_at')
        batch_op.drop_column('line_count')
        batch_op.drop_column('tenant_id')

    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_chunks_worker'))
        batch_op.drop_column('failures')
        batch_op.drop_column('leased_at')
        batch_op.drop_column('worker')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_batches_tenant_id'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_batches_tenant_id'))
        batch_op.create_unique_constraint(batch_op.f('uq_batches_idempotency_key'), ['idempotency_key'])
        batch_op.drop_column('output_expires_after_s')
        batch_op.drop_column('validation_attempts')
        batch_op.drop_column('tenant_id')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))

    op.drop_table('api_keys')
    op.drop_table('tenants')
