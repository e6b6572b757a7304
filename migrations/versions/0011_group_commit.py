"""group commit: a decision's wait for a slot apart from its call's latency; stats show both

Revision ID: 0011_group_commit
Revises: 0010_open_tasks
Create Date: 2026-12-07

``latency_ms`` is the call's own time (its attempts, back-off and fallback); the new
``wait_ms`` is the time it queued for a free slot first (the arms' and the gateway's
``max_in_flight``, a local model serving one call at a time). Rows stored before this revision
have NULL in ``wait_ms``. The ``arm_summary`` view (``metallm stats``) gains
``mean_wait_ms`` beside ``mean_latency_ms``.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_group_commit"
down_revision = "0010_open_tasks"
branch_labels = None
depends_on = None

# 0010_open_tasks' view, with mean_wait_ms as a last column (CREATE OR REPLACE may only append)
ARM_SUMMARY = """
CREATE OR REPLACE VIEW arm_summary AS
SELECT arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER ()                AS share,
       count(*) FILTER (WHERE label IS NOT NULL OR score IS NOT NULL)
                                                              AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(cost_usd)                                          AS cost_per_decision,
       avg(reward)                                            AS mean_reward,
       avg(latency_ms)                                        AS mean_latency_ms,
       count(*) FILTER (WHERE status <> 'ok')                 AS failures,
       avg(score)                                             AS mean_score,
       avg(wait_ms)                                           AS mean_wait_ms
FROM decisions
GROUP BY arm
"""

# the view as 0010_open_tasks made it (a downgrade drops the column mean_wait_ms reads)
OLD_ARM_SUMMARY = """
CREATE VIEW arm_summary AS
SELECT arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER ()                AS share,
       count(*) FILTER (WHERE label IS NOT NULL OR score IS NOT NULL)
                                                              AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(cost_usd)                                          AS cost_per_decision,
       avg(reward)                                            AS mean_reward,
       avg(latency_ms)                                        AS mean_latency_ms,
       count(*) FILTER (WHERE status <> 'ok')                 AS failures,
       avg(score)                                             AS mean_score
FROM decisions
GROUP BY arm
"""


def upgrade() -> None:
    op.add_column("decisions", sa.Column("wait_ms", sa.Float, nullable=True))
    op.execute(ARM_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW arm_summary")
    op.execute(OLD_ARM_SUMMARY)
    op.drop_column("decisions", "wait_ms")
