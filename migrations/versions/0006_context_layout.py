"""the layout of each decision's context

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

The policy decides on a context built from the query (bias, length, task, declared metadata
features, a reduced embedding: ``service.context``), no longer on the raw embedding alone.
``context_layout`` names the layout the stored ``context`` vector is in; rows stored before
this revision hold the raw embedding, and NULL stands for that layout ("legacy").
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("context_layout", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "context_layout")
