"""The benchmark protocol, the baselines and a small real training run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from recsys_core.data import paths
from training import baselines, protocol


@pytest.fixture(scope="module")
def beauty(dataset):
    return protocol.category_split(dataset.interactions, dataset.items, "Beauty")


def test_split_holds_out_the_last_two_events_by_seq(dataset, beauty):
    user = beauty.users[0]
    events = dataset.interactions[(dataset.interactions.user_id == user) & (dataset.interactions.category == "Beauty")]
    ordered = events.sort_values("seq").item_id.tolist()
    assert beauty.item_ids[beauty.targets("test")[0]] == ordered[-1]
    assert beauty.item_ids[beauty.targets("valid")[0]] == ordered[-2]
    assert [beauty.item_ids[i] for i in beauty.inputs("test")[0]] == ordered[:-1]
    assert [beauty.item_ids[i] for i in beauty.training_sequences()[0]] == ordered[:-2]


def test_ranks_leave_history_out_and_count_ties_against_the_target():
    histories = [np.array([0, 1]), np.array([2])]
    scores = np.array([[9.0, 8.0, 1.0, 0.5], [5.0, 5.0, 5.0, 5.0]])
    ranks = protocol.target_ranks(lambda h: scores[: len(h)], histories, np.array([2, 3]))
    assert list(ranks) == [0, 2], "history items 0 and 1 do not count; a tie of three ranks the target last"
    metrics = protocol.metrics_from_ranks(np.array([0, 10, 30]))
    assert metrics["recall@10"] == pytest.approx(1 / 3) and metrics["recall@20"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx(1 / 3)


def test_baselines_order_on_the_bundled_subset(beauty, dataset, exported_encoder):
    from training.items import default_encoder, split_item_vectors

    popularity = protocol.evaluate(baselines.popularity_scorer(beauty), beauty)
    cooccurrence = protocol.evaluate(baselines.cooccurrence_scorer(beauty), beauty)
    zero_shot = protocol.evaluate(
        baselines.zero_shot_scorer(beauty, split_item_vectors(beauty, dataset.items, default_encoder(), False)), beauty
    )
    assert zero_shot["recall@10"] > popularity["recall@10"]
    assert cooccurrence["recall@10"] >= popularity["recall@10"]


def test_cross_category_task_ranks_only_the_target_category(dataset):
    task = protocol.cross_category_task(dataset.interactions, dataset.items, "Beauty", "Toys_and_Games")
    assert len(task.split.users) > 50
    assert all(task.candidates[t] for t in task.targets())
    assert not any(task.candidates[i] for history in task.inputs() for i in history)


def test_training_lowers_the_loss_and_beats_popularity(tmp_path, beauty, dataset, exported_encoder):
    """CI's training smoke run: a few epochs of our model (the MiniLM's top
    layer fine-tuned) on the bundled Beauty, as `recsys train` and `recsys evaluate` run it."""
    from training import commands, modeldir, seqmodel

    out = tmp_path / "model"
    assert commands.train_main(["--data", str(paths.BUNDLED_DATA_DIR), "--categories", "Beauty",
                                "--out", str(out), "--max-epochs", "2", "--max-minutes", "10", "--encoder-batch", "32",
                                "--no-progress", "--no-guard"]) == 0
    losses = json.loads((out / modeldir.MANIFEST).read_text())["training"]["losses"]
    assert losses[-1] < losses[0]
    model = modeldir.load_for_scoring(out, beauty, dataset.items)
    ours = protocol.evaluate(seqmodel.scorer(model), beauty)
    popularity = protocol.evaluate(baselines.popularity_scorer(beauty), beauty)
    assert ours["ndcg@10"] > popularity["ndcg@10"]
    assert ours["recall@10"] > popularity["recall@10"]


def test_recsys_evaluate_scores_the_cross_category_task(capsys):
    """`recsys evaluate --cross`: serving's ranking with other shoppers'
    co-purchases against popularity in the target, and the refusals."""
    from training import commands

    def cross(baseline: str) -> dict:
        assert commands.evaluate_main(["--data", str(paths.BUNDLED_DATA_DIR), "--cross", "Beauty:Toys_and_Games",
                                       "--baseline", baseline, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["results"]["Beauty:Toys_and_Games"]

    ranking, popularity = cross("ranking"), cross("popularity")
    assert ranking["users"] == popularity["users"] > 50
    assert ranking["mrr"] > popularity["mrr"] and ranking["recall@20"] > popularity["recall@20"]
    for bad in (["--cross", "Beauty:Toys_and_Games", "--baseline", "sasrec"],
                ["--cross", "Beauty:Beauty", "--baseline", "zero-shot"],
                ["--cross", "Beauty-Toys", "--baseline", "zero-shot"]):
        with pytest.raises(SystemExit):
            commands.evaluate_main(["--data", str(paths.BUNDLED_DATA_DIR), *bad])
        assert "--cross" in capsys.readouterr().err
