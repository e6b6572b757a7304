"""per-arm policy scores at decision time; arm_summary and hourly_stats views

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# share: of all decisions in the group's scope; accuracy and reward: over labeled decisions only
ARM_SUMMARY = """
CREATE VIEW arm_summary AS
SELECT arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER ()                AS share,
       count(label)                                           AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(cost_usd)                                          AS cost_per_decision,
       avg(reward)                                            AS mean_reward,
       avg(latency_ms)                                        AS mean_latency_ms,
       count(*) FILTER (WHERE status <> 'ok')                 AS failures
FROM decisions
GROUP BY arm
"""

HOURLY_STATS = """
CREATE VIEW hourly_stats AS
SELECT date_trunc('hour', decided_at)                         AS hour,
       arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER (PARTITION BY date_trunc('hour', decided_at))
                                                              AS share,
       count(label)                                           AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(reward)                                            AS mean_reward
FROM decisions
GROUP BY 1, 2
"""


def upgrade() -> None:
    op.add_column("decisions", sa.Column("arm_scores", postgresql.JSONB))
    op.execute(ARM_SUMMARY)
    op.execute(HOURLY_STATS)


def downgrade() -> None:
    op.execute("DROP VIEW hourly_stats")
    op.execute("DROP VIEW arm_summary")
    op.drop_column("decisions", "arm_scores")
