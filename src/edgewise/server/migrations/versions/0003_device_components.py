"""device_components: a device's components besides its model (container apps)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 12:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_components',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('component', sa.String(length=64), nullable=False),
    sa.Column('assigned_release_id', sa.String(length=32), nullable=True),
    sa.Column('release_id', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['assigned_release_id'], ['releases.id'], ),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['release_id'], ['releases.id'], ),
    sa.PrimaryKeyConstraint('device_id', 'component')
    )


def downgrade() -> None:
    op.drop_table('device_components')
