"""`recsys train`'s robust defaults (issue #18): early stopping restores the
best epoch's weights, and the guard never lets a model that loses to the
untrained serving path on validation be served. Small real trainings on a
slice of the bundled Office_Products (the category the defaults were not
tuned on)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys_core.models import model_serving
from training import commands, guard, protocol, seqmodel, twotower


@pytest.fixture(scope="module")
def office(dataset):
    """The first 110 Office shoppers and the items they touch: a catalogue
    small enough for a few epochs in seconds."""
    full = protocol.category_split(dataset.interactions, dataset.items, "Office_Products")
    sequences = full.sequences[:110]
    used = sorted({int(i) for s in sequences for i in s})
    index = {old: new for new, old in enumerate(used)}
    return protocol.CategorySplit(category="Office_Products", item_ids=[full.item_ids[i] for i in used],
                                  users=full.users[:110],
                                  sequences=[np.asarray([index[int(i)] for i in s]) for s in sequences])


@pytest.fixture(scope="module")
def untrained_model(office, dataset):
    model = twotower.build(office, dataset.items, twotower.TwoTowerConfig(), progress=False)
    # Training on one thread: steps this small gain nothing from a second
    # one, which on a shared machine mostly spins (encoding the items did gain).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model
    torch.set_num_threads(threads)


def fitted(model, office, **settings):
    model = copy.deepcopy(model)
    # Few items re-encoded per step: the step's cost, not what is tested.
    model.config = config = twotower.TwoTowerConfig(batch_size=32, encoder_batch=16, **settings)
    model.items.id_dropout = config.id_dropout
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, seqmodel.fit(model, office, config, progress=False), start


def valid(model, office) -> dict:
    return protocol.evaluate(seqmodel.scorer(model), office, "valid")


@pytest.fixture(scope="module")
def trained(untrained_model, office):
    """The default settings, patience lifted so that epochs past the peak
    run: on this slice validation peaks early and falls after."""
    return fitted(untrained_model, office, max_epochs=3, patience=10)


def test_early_stopping_restores_the_best_epochs_weights(trained, office):
    """The model handed back is the best epoch's, not the last one's."""
    model, result, _ = trained
    history = dict(result.valid_history)
    assert sorted(history) == [1, 2, 3]  # every epoch evaluated
    best_epoch = max(history, key=history.get)
    assert result.best_epoch == best_epoch < 3 and history[3] < history[best_epoch]
    assert valid(model, office)["ndcg@10"] == pytest.approx(history[best_epoch], abs=1e-9)


def test_the_guard_serves_a_model_only_above_the_untrained_path(untrained_model, trained, office, dataset):
    pretrained = untrained_model.items.table.numpy().copy()
    untrained = guard.untrained_valid(office, dataset.items, pretrained)

    # A learning rate that wrecks the model: it must fall back, reset to its start.
    model, result, start = fitted(untrained_model, office, lr=3.0, id_lr=3.0, max_epochs=1)
    assert result.best_valid["ndcg@10"] < untrained["ndcg@10"]
    decision = commands.apply_guard(model, office, dataset.items, pretrained, start)
    assert decision["decision"] == "untrained" and not model_serving.serves_model({"guard": decision})
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())

    # The defaults: whatever is served is at least the untrained path on validation.
    model, result, start = copy.deepcopy(trained)
    decision = commands.apply_guard(model, office, dataset.items, pretrained, start)
    served = valid(model, office) if decision["serve_model"] else untrained
    assert all(served[m] >= untrained[m] for m in guard.METRICS)
    if decision["serve_model"]:
        assert all(served[m] > untrained[m] for m in guard.METRICS)
    else:
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_guard_decision_rule_and_old_directories():
    untrained = {"recall@10": 0.05, "ndcg@10": 0.03}
    ahead = {"recall@10": 0.06, "ndcg@10": 0.031}
    sure = {m: {"difference": 0.01, "ci95": [0.001, 0.02]} for m in guard.METRICS}
    noise = {**sure, "ndcg@10": {"difference": 0.001, "ci95": [-0.004, 0.006]}}
    assert guard.decide(ahead, untrained, sure)["serve_model"]
    assert not guard.decide(ahead, untrained, noise)["serve_model"]  # ahead, but within validation noise
    assert guard.decide({"recall@10": 0.06, "ndcg@10": 0.031}, untrained)["serve_model"]
    assert not guard.decide({"recall@10": 0.06, "ndcg@10": 0.03}, untrained)["serve_model"]  # a tie falls back
    assert not guard.decide({"recall@10": 0.04, "ndcg@10": 0.05}, untrained)["serve_model"]  # both metrics
    assert not guard.decide({}, untrained)["serve_model"]  # never evaluated
    assert model_serving.serves_model({"format": model_serving.FORMAT})  # written before the guard


def test_model_serving_refuses_a_directory_its_guard_held_back(tmp_path, capsys):
    """Only the manifest is read before the refusal: a held-back directory
    never reaches a Triton repository by mistake."""
    import json

    from recsys_core.models import model_serving

    held_back = guard.decide({"recall@10": 0.01, "ndcg@10": 0.01}, {"recall@10": 0.05, "ndcg@10": 0.03})
    manifest = {"format": model_serving.FORMAT, "guard": held_back}
    assert not model_serving.serves_model(manifest)
    (tmp_path / model_serving.MANIFEST).write_text(json.dumps(manifest))
    assert model_serving.main([str(tmp_path), "--out", str(tmp_path / "repo")]) == 1
    assert "training guard held the model back" in capsys.readouterr().err
    # Overridden, the directory is checked as any other (this one has no files).
    assert model_serving.main([str(tmp_path), "--out", str(tmp_path / "repo"), "--ignore-guard"]) == 1
    assert "guard" not in capsys.readouterr().err and not (tmp_path / "repo").exists()
