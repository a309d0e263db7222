"""Bucket notifications: hook sources may map object keys to checkpoints (prefix, pattern,
markers)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hook_sources', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prefix', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('pattern', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('markers', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hook_sources', schema=None) as batch_op:
        batch_op.drop_column('markers')
        batch_op.drop_column('pattern')
        batch_op.drop_column('prefix')
