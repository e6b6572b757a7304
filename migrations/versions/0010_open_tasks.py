"""open-ended tasks and scored feedback: a score in [0, 1] instead of a label

Revision ID: 0010_open_tasks
Revises: 0009_priced_decisions
Create Date: 2026-12-07

A label event may carry a ``score`` in [0, 1] instead of a ``label`` (a user's thumbs, a
grader's mark); an open task's reference label is turned into a score by the task's check.
``decisions.score`` keeps the score its feedback gave (NULL: no feedback, or a label's verdict,
which ``correct`` holds); a score waiting for its decision is kept in ``pending_labels`` with
a NULL label. The views count scored decisions as labeled and show their mean score.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_open_tasks"
down_revision = "0009_priced_decisions"
branch_labels = None
depends_on = None

# 0003's views, with scored decisions counted as labeled and their mean score (a last column)
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
       avg(score)                                             AS mean_score
FROM decisions
GROUP BY arm
"""

HOURLY_STATS = """
CREATE OR REPLACE VIEW hourly_stats AS
SELECT date_trunc('hour', decided_at)                         AS hour,
       arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER (PARTITION BY date_trunc('hour', decided_at))
                                                              AS share,
       count(*) FILTER (WHERE label IS NOT NULL OR score IS NOT NULL)
                                                              AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(reward)                                            AS mean_reward,
       avg(score)                                             AS mean_score
FROM decisions
GROUP BY 1, 2
"""

# the views as 0003 made them (a downgrade drops the column they read)
OLD_ARM_SUMMARY = """
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

OLD_HOURLY_STATS = """
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
    op.add_column("decisions", sa.Column("score", sa.Float, nullable=True))
    op.create_check_constraint("score_in_0_1", "decisions", "score >= 0 AND score <= 1")
    op.add_column("pending_labels", sa.Column("score", sa.Float, nullable=True))
    op.alter_column("pending_labels", "label", existing_type=sa.Text, nullable=True)
    op.create_check_constraint("label_or_score", "pending_labels", "num_nonnulls(label, score) = 1")
    op.execute(ARM_SUMMARY)
    op.execute(HOURLY_STATS)


def downgrade() -> None:
    op.execute("DROP VIEW hourly_stats")
    op.execute("DROP VIEW arm_summary")
    op.execute(OLD_ARM_SUMMARY)
    op.execute(OLD_HOURLY_STATS)
    op.execute("DELETE FROM pending_labels WHERE label IS NULL")  # scores: no label to keep
    op.drop_constraint("label_or_score", "pending_labels", type_="check")
    op.alter_column("pending_labels", "label", existing_type=sa.Text, nullable=False)
    op.drop_column("pending_labels", "score")
    op.drop_constraint("score_in_0_1", "decisions", type_="check")
    op.drop_column("decisions", "score")
