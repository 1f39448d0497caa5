"""`recsys evaluate --served`: the protocol's metrics on a running stack's replies."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from training import protocol


def test_scoring_a_returned_list_matches_the_protocol_on_a_fixed_ranking():
    """A reply holding a scorer's top 20 items (history left out, as Recommend
    leaves seen items out) scores exactly what target_ranks gives that scorer."""
    rng = np.random.default_rng(7)
    n_users, n_items = 40, 60
    scores = rng.permutation(n_users * n_items).reshape(n_users, n_items).astype(float)  # no ties
    histories = [rng.choice(n_items, size=3, replace=False) for _ in range(n_users)]
    targets = np.asarray([rng.choice(np.setdiff1d(np.arange(n_items), h)) for h in histories])
    offline = protocol.metrics_from_ranks(protocol.target_ranks(lambda _: scores, histories, targets))

    k = max(protocol.CUTOFFS)
    returned = []
    for row, history in enumerate(histories):
        order = [int(i) for i in np.argsort(-scores[row]) if i not in set(history)]
        returned.append(order[:k])
    served = protocol.metrics_from_ranks(protocol.list_ranks(returned, targets))
    for name in ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "users"):
        assert served[name] == pytest.approx(offline[name])
    # Some targets inside the list and some outside it: the check means something.
    assert 0 < offline["recall@20"] < 1 and offline["recall@10"] < offline["recall@20"]


def test_a_target_missing_from_the_list_is_a_miss_at_every_cutoff():
    ranks = protocol.list_ranks([["a", "b"], ["c"], []], ["b", "x", "y"])
    assert ranks[0] == 1 and ranks[1] == ranks[2] == protocol.MISS_RANK
    metrics = protocol.metrics_from_ranks(ranks)
    assert metrics["recall@10"] == pytest.approx(1 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 / np.log2(3)) / 3)


def test_heldout_data_drops_exactly_each_evaluated_shoppers_test_event():
    events = pd.DataFrame({
        "user_id": ["u"] * 4 + ["v"] * 2 + ["u"] * 3,
        "item_id": ["a", "b", "c", "d", "e", "f", "g", "h", "i"],
        "category": ["X"] * 6 + ["Y"] * 3,
        "seq": [3, 0, 1, 2, 0, 1, 0, 2, 1],  # not in seq order in the file
        "timestamp": [0] * 9, "rating": [np.nan] * 9,
    })
    kept = protocol.heldout_interactions(events)
    # u in X: seq 3 ("a") is the test event; u in Y: seq 2 ("h"); v has 2 events: not evaluated, kept whole.
    assert sorted(kept.item_id) == ["b", "c", "d", "e", "f", "g", "i"]
    split = protocol.category_split(events, events[["item_id", "category"]], "X")
    held = {split.users[i]: split.item_ids[t] for i, t in enumerate(split.targets("test"))}
    assert held == {"u": "a"}


def test_heldout_copy_of_one_category_keeps_only_its_items_and_events(tmp_path, capsys):
    """`--write-heldout DIR --category C`: a stack serving one category's
    model gets that category alone, still without its test events."""
    from recsys_cli import served
    from recsys_core.data import paths, shopping

    out = tmp_path / "toys"
    assert served.main(["--write-heldout", str(out), "--data", str(paths.BUNDLED_DATA_DIR),
                        "--category", "Toys_and_Games"]) == 0
    events = shopping.load_interactions(paths.BUNDLED_DATA_DIR)
    toys = events[events.category == "Toys_and_Games"]
    kept, items = shopping.load_interactions(out), shopping.load_items(out)
    assert set(kept.category) == {"Toys_and_Games"}
    assert len(kept) == len(protocol.heldout_interactions(toys)) < len(toys)
    # Every item a Toys shopper bought, some filed under another category; no other.
    assert set(kept.item_id) <= set(items.item_id)
    assert set(items.item_id) <= set(toys.item_id) | set(
        shopping.load_items(paths.BUNDLED_DATA_DIR).query("category == 'Toys_and_Games'").item_id)
    assert (items.category == "Toys_and_Games").mean() > 0.9
    with pytest.raises(SystemExit) as refused:
        served.main(["--write-heldout", str(tmp_path / "none"), "--data", str(paths.BUNDLED_DATA_DIR),
                     "--category", "Garden"])
    assert refused.value.code == 2 and "Garden" in capsys.readouterr().err


# -- against the session's stack ---------------------------------------------------

def served_args(stack, tmp_path, *extra, known_test_items: bool = True):
    """The session's stack is served on the full bundled data, held-out items
    included: its figures check the machinery, not the model."""
    from tests.conftest import tls_material

    return ["evaluate", "--served", stack.gateway, "--profile", stack.profile,
            "--certs", str(tls_material().directory), "--category", "Beauty", "--max-shoppers", "4",
            "--concurrency", "2", "--timeout", "20", "--no-progress", "--json", str(tmp_path / "out.json"),
            *(["--allow-known-test-items"] if known_test_items else []), *extra]


@pytest.mark.integration
def test_served_evaluation_refuses_a_stack_that_holds_the_held_out_items(stack, tmp_path, monkeypatch, capsys):
    from recsys_cli.main import main
    from tests.conftest import admin_token

    monkeypatch.setenv("RECSYS_TOKEN", admin_token())
    assert main(served_args(stack, tmp_path, known_test_items=False)) == 2
    assert "already holds the held-out item" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.integration
def test_served_evaluation_scores_replayed_shoppers_without_their_held_out_item(stack, dataset, tmp_path,
                                                                                monkeypatch, capsys):
    from recsys_cli.client import call_profile
    from recsys_cli.main import main
    from tests.conftest import admin_token, gateway_channel

    monkeypatch.setenv("RECSYS_TOKEN", admin_token())
    prefix = f"t{np.random.default_rng().integers(1 << 30):x}-"
    assert main(served_args(stack, tmp_path, "--user-prefix", prefix, "--keep-replays")) == 0
    summary = json.loads((tmp_path / "out.json").read_text())
    served = summary["results"]["Beauty"]["served"]
    assert served["shoppers"] == served["users"] == 4 and served["failed"] == 0
    for name in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert 0.0 <= served[name] <= 1.0
    assert sum(served["paths"].values()) == 4 and "Beauty" in capsys.readouterr().out

    # Each replayed shopper holds their history, and never the held-out item.
    split = protocol.category_split(dataset.interactions, dataset.items, "Beauty")
    from recsys_cli.served import sample_indices

    for index in sample_indices(len(split.users), 4, 0):
        replay_id = f"{prefix}{split.users[index]}-Beauty"
        with gateway_channel(stack.gateway) as channel:
            reply = call_profile(stack.gateway, replay_id, 500, 20.0, channel=channel)
        history = [split.item_ids[i] for i in split.sequences[index][:-1]]
        held_out = split.item_ids[split.sequences[index][-1]]
        assert reply.known and reply.event_count == len(history)
        assert sorted(e.item_id for e in reply.recent_history) == sorted(history)
        if held_out not in history:
            assert held_out not in reply.seen_item_ids

    # A rerun under the same ids stores nothing twice (idempotency keys),
    # and, without --keep-replays, forgets them: the session's stack is left
    # with no share of these replays in its counts.
    assert main(served_args(stack, tmp_path, "--user-prefix", prefix, "--keep-replays")) == 0
    with gateway_channel(stack.gateway) as channel:
        index = sample_indices(len(split.users), 4, 0)[0]
        reply = call_profile(stack.gateway, f"{prefix}{split.users[index]}-Beauty", 500, 20.0, channel=channel)
    assert reply.event_count == len(split.sequences[index]) - 1
    assert main(served_args(stack, tmp_path, "--user-prefix", prefix)) == 0
    with gateway_channel(stack.gateway) as channel:
        assert not call_profile(stack.gateway, f"{prefix}{split.users[index]}-Beauty", 10, 20.0, channel=channel).known


@pytest.mark.integration
def test_served_evaluation_forgets_its_shoppers_by_default(stack, tmp_path, monkeypatch):
    from recsys_cli.client import call_profile
    from recsys_cli.main import main
    from tests.conftest import admin_token, gateway_channel

    monkeypatch.setenv("RECSYS_TOKEN", admin_token())
    prefix = f"t{np.random.default_rng().integers(1 << 30):x}-"
    assert main(served_args(stack, tmp_path, "--user-prefix", prefix, "--max-shoppers", "1")) == 0
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["results"]["Beauty"]["served"]["users"] == 1
    from recsys_core.data import paths, shopping
    from recsys_cli.served import sample_indices

    data = shopping.Dataset.load(paths.BUNDLED_DATA_DIR)
    split = protocol.category_split(data.interactions, data.items, "Beauty")
    user = split.users[sample_indices(len(split.users), 1, 0)[0]]
    with gateway_channel(stack.gateway) as channel:
        assert not call_profile(stack.gateway, f"{prefix}{user}-Beauty", 10, 20.0, channel=channel).known


@pytest.mark.integration
def test_served_evaluation_against_a_wrong_address_fails_with_the_code(stack, tmp_path, monkeypatch, capsys):
    from recsys_cli.main import main
    from recsys_cli.stack import free_port
    from tests.conftest import admin_token

    monkeypatch.setenv("RECSYS_TOKEN", admin_token())
    args = served_args(stack, tmp_path, "--timeout", "3")
    args[args.index(stack.profile)] = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert main(args) == 1
    summary = json.loads((tmp_path / "out.json").read_text())
    served = summary["results"]["Beauty"]["served"]
    assert served["failed"] == 4 and served["users"] == 0
    assert served["failures"] == {"ingest: UNAVAILABLE": 4}
    assert "4 shoppers not scored" in capsys.readouterr().err
    # --allow-failures: the same run reports and exits 0.
    assert main([*args, "--allow-failures"]) == 0
    capsys.readouterr()
    # A gateway that does not answer: nothing is replayed, one line says why.
    args = served_args(stack, tmp_path, "--timeout", "3")
    args[args.index(stack.gateway)] = f"127.0.0.1:{free_port()}"
    assert main(args) == 1
    assert "did not answer GetProfile: UNAVAILABLE" in capsys.readouterr().err


def test_served_targets_table_says_beaten_only_above_the_published_row_on_both_metrics(tmp_path):
    """scripts/served_targets.py: served figures against the strongest
    published row of the category (ICSRec for Toys: 0.1055 / 0.0657)."""
    from scripts import served_targets

    figures = {"recall@10": 0.11, "ndcg@10": 0.07, "recall@20": 0.15, "ndcg@20": 0.08, "users": 10}
    manifest = tmp_path / "ranker.json"
    manifest.write_text(json.dumps({"data": {"category": "Toys_and_Games"}, "test": {
        "learned": figures, "single_source": {"model_similarity": {**figures, "ndcg@10": 0.06},
                                              "log_popularity": {**figures, "ndcg@10": 0.01}}}}))

    def table(served_figures):
        served = tmp_path / "served.json"
        served.write_text(json.dumps({"results": {"Toys_and_Games": {"served": served_figures}}}))
        return served_targets.markdown({"Toys_and_Games": served_targets.gather("Toys_and_Games", manifest, served)})

    assert "| **beaten** |" in table(figures)
    assert "Recall@10 only" in table({**figures, "ndcg@10": 0.0657})  # equal is not above
    assert "**not beaten**" in table({**figures, "recall@10": 0.1, "ndcg@10": 0.06})
    assert "best single source (model)" in table(figures)
    with pytest.raises(SystemExit, match="not Beauty"):
        served_targets.gather("Beauty", manifest, None)
