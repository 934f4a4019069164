"""rollout_devices.left_at: a device whose component the operator removed leaves the rollout

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 19:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rollout_devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('left_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rollout_devices', schema=None) as batch_op:
        batch_op.drop_column('left_at')
