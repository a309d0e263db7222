"""Remote checkpoints: a provisional fingerprint fits checkpoints.fingerprint ("uri:" + sha256);
jobs record the content fingerprint, the resolved revision and fetch progress

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 02:50:35.180537
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.alter_column('fingerprint', existing_type=sa.VARCHAR(length=64), type_=sa.String(length=72),
                              existing_nullable=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_fingerprint', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('resolved_revision', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('progress')
        batch_op.drop_column('resolved_revision')
        batch_op.drop_column('content_fingerprint')

    # a remote checkpoint's provisional fingerprint ("uri:" + 64 hex) keeps its hash, which fits
    op.execute("UPDATE checkpoints SET fingerprint = substr(fingerprint, 5) WHERE fingerprint LIKE 'uri:%'")
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.alter_column('fingerprint', existing_type=sa.String(length=72), type_=sa.VARCHAR(length=64),
                              existing_nullable=False)
