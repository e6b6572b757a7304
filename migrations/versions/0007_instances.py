"""which instance decided, and the seed of its random draws

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Several service instances may share one database (one consumer group, one policy learned
through Postgres). Each draws its exploration from a random generator seeded for that
instance and start; a decision records the instance and the seed, so a decision's draw can be
traced to the process that made it. Rows stored before this revision have NULL in both.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("instance", sa.Text, nullable=True))
    op.add_column("decisions", sa.Column("rng_seed", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "rng_seed")
    op.drop_column("decisions", "instance")
