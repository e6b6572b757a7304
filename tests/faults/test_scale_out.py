"""Several ``metallm serve`` instances in one consumer group on one database (issue 16): 3,000
queries and their labels over 6 partitions, the fleet scaled 1 → 3 → 2 mid-stream, a random
instance killed with -9 at seeded points (and once while restarting), each restarted at once;
SIGTERM for every instance left at the end. See ``tests/faults/scale_scenario.py``."""

from __future__ import annotations

import pytest

from tests.conftest import DATABASE_URL
from tests.faults import scale_scenario

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_instances_scaled_and_killed_share_one_log_lose_nothing_and_agree(
    broker, pg_schema, tmp_path
):
    f = scale_scenario.run(broker, DATABASE_URL, pg_schema, tmp_path, say=print)
    print(f.as_dict())
    assert f.queries == 3000 and f.partitions == 6
    # the fleet went 1 → 3 → 2, with every kill restarted; every SIGTERM exited 0
    assert f.max_instances == 3 and f.final_instances == 2
    assert f.scaled_out == 2 and f.scaled_in == 1
    assert f.kills == 5 and f.restarts == 5
    assert f.exit_codes == [0, 0, 0]
    # every query has exactly one decision (query_id is the primary key), each published
    assert f.decisions == f.queries and f.lost_decisions == 0 and f.unknown_decisions == 0
    assert f.decision_events_missing == 0
    # the decisions were made by several instances, each with the seed of its own draws
    assert f.deciding_instances >= 3
    assert f.decisions_without_seed == 0 and f.most_seeds_per_instance == 1
    assert f.distinct_seeds == f.deciding_instances and f.seed_mismatches == 0
    # no LLM call reached an arm after its query's decision was made, by any instance; the
    # repeats are calls cut off by a kill or a rebalance before their decision was stored
    assert f.calls_after_decided == 0
    assert f.discarded_elsewhere_logged == 0
    assert f.repeated_calls == f.repeated_after_kill + f.repeated_after_rebalance
    # every instance followed the others' appends (LISTEN/NOTIFY and its poll) throughout
    assert f.log_follower_failures == 0
    # every label applied exactly once: one reward per decision, none twice, none waiting
    assert f.rewards_stored == f.queries and f.lost_rewards == 0
    assert f.duplicate_reward_seqs == 0 and f.policy_update_mismatches == 0
    assert f.labels_pending == 0 and f.labels_pending_beside_decision == 0
    # a label repeated is counted as a duplicate (a label redelivered by a rebalance is not)
    assert f.duplicate_labels_counted == f.duplicate_labels_published
    # every instance's policy is the log replayed in reward_seq order, to 1e-9: the two left
    # at the end (with every reward), the one stopped mid-stream (up to its watermark), and
    # a restart's (the last checkpoint plus the log after it)
    assert f.policy_dumps == 3 and f.final_policies == 2
    assert f.final_watermark_lag == 0
    assert f.max_policy_difference <= 1e-9
    assert f.max_stopped_policy_difference <= 1e-9
    assert f.restored_policy_difference <= 1e-9
    assert f.final_checkpoint_updates == f.queries
