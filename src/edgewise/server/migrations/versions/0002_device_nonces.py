"""device_nonces: the replay guard replicas share

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 05:52:06.061101
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_nonces',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('device_id', 'nonce')
    )
    with op.batch_alter_table('device_nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_nonces_expires_at'), ['expires_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('device_nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_nonces_expires_at'))

    op.drop_table('device_nonces')
