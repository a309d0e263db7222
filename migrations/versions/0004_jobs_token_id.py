"""jobs.token_id: the API token that submitted a job (a submit-only token reads its own jobs)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 02:22:43.417046
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # jobs submitted before this revision have no token: only tokens with the read scope see them
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('token_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_token_id'), ['token_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_jobs_token_id_api_tokens'), 'api_tokens', ['token_id'], ['id'],
                                    ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_token_id_api_tokens'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_token_id'))
        batch_op.drop_column('token_id')
