"""Our model with the MiniLM fine-tuned: the cached-layers split of the
encoder, a small real training on the bundled Beauty, and the model
directory it exports (encoder and user tower as ONNX)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recsys_core.data import paths
from recsys_core.models.encoder import OnnxEncoder
from training import baselines, finetune, modeldir, protocol, seqmodel, twotower
from training.items import split_item_texts


@pytest.fixture(scope="module")
def beauty(dataset):
    return protocol.category_split(dataset.interactions, dataset.items, "Beauty")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, exported_encoder):
    """Two epochs of `recsys train` on the bundled Beauty, top MiniLM layer fine-tuned."""
    from training import commands

    out = tmp_path_factory.mktemp("finetuned") / "model"
    assert commands.train_main(["--data", str(paths.BUNDLED_DATA_DIR), "--categories", "Beauty", "--out", str(out),
                                "--finetune-layers", "1", "--encoder-batch", "32", "--max-epochs", "2", "--max-minutes", "10",
                                "--no-progress", "--no-guard", "--register", "--registry", str(out.parent / "registry")]) == 0
    return out


def test_top_layers_over_cached_states_are_the_whole_encoder(exported_encoder):
    """Splitting MiniLM at the frozen layers changes nothing: the top layers
    over the cached states give the full encoder's vectors, which at the start
    (identity projection) are the exported pretrained encoder's."""
    from recsys_core.models.export import pretrained_model_dir

    texts = ["Lavender body lotion, 8 oz. Category: Beauty, Skin Care, Body",
             "Wooden train set with 40 pieces. Category: Toys & Games", "nail polish"]
    encoder, tokenizer = finetune.load_encoder(pretrained_model_dir(), trainable_layers=2)
    states = finetune.lower_token_states(encoder, tokenizer, texts, cache_dir=None, progress=False)
    cached = finetune.encode_all(encoder, states)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        whole = encoder.eval()(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(cached.numpy(), whole.numpy(), atol=2e-3)  # states are stored in float16
    pretrained = OnnxEncoder(exported_encoder, precision="fp32").encode(texts)
    np.testing.assert_allclose(whole.numpy(), pretrained, atol=1e-4)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.encoder.layer.4.", "transformer.encoder.layer.5.", "projection."))
                             for n in trainable)


def test_a_new_model_starts_as_the_pretrained_zero_shot_ranking(beauty, dataset):
    """The shopper tower starts as the recency mix of the history's pretrained
    vectors: the same ranking as the zero-shot baseline."""
    model = twotower.build(beauty, dataset.items, twotower.TwoTowerConfig(), progress=False)
    histories = beauty.inputs("test")[:50]
    ours = seqmodel.scorer(model)(histories)
    zero_shot = baselines.zero_shot_scorer(beauty, model.items.table.numpy())(histories)
    assert np.mean(np.argmax(ours, 1) == np.argmax(zero_shot, 1)) == 1.0


def test_without_correction_the_user_tower_is_the_recency_mix_at_its_own_decay(beauty, dataset):
    """The decay-chosen transfer model (scripts/results.py): no correction,
    so it ranks as the zero-shot mix at the decay it carries, and a
    different decay ranks differently."""
    import math

    model = twotower.build(beauty, dataset.items, twotower.TwoTowerConfig(correction=False, recency_decay=2.5),
                           progress=False)
    histories = [h for h in beauty.inputs("test") if len(h) >= 4][:50]
    vectors = model.items.table.numpy()
    ours = seqmodel.scorer(model)(histories)
    at_own_decay = baselines.zero_shot_scorer(beauty, vectors, decay=2.5)(histories)
    at_default = baselines.zero_shot_scorer(beauty, vectors)(histories)
    assert np.mean(np.argmax(ours, 1) == np.argmax(at_own_decay, 1)) == 1.0
    assert np.mean(np.argmax(ours, 1) == np.argmax(at_default, 1)) < 1.0
    with torch.no_grad():
        model.user.out.weight.fill_(1.0)  # a correction, were it used, would change every score
    assert np.allclose(seqmodel.scorer(model)(histories), ours)
    assert math.isclose(float(model.user.log_decay.exp()), 2.5, rel_tol=1e-6)


def test_fine_tuning_lowers_the_loss_moves_only_the_top_layer_and_beats_popularity(trained, beauty, dataset):
    from recsys_core.models.export import pretrained_model_dir

    manifest = json.loads((trained / modeldir.MANIFEST).read_text())
    losses = manifest["training"]["losses"]
    assert len(losses) == 2 and losses[-1] < losses[0]
    tuned, _ = finetune.load_transformer(trained / modeldir.TRAINING_DIR / modeldir.TRANSFORMER_DIR)
    pretrained, _ = finetune.load_transformer(pretrained_model_dir())
    tuned, pretrained = tuned.state_dict(), pretrained.state_dict()
    changed = {name for name in pretrained if not torch.equal(tuned[name], pretrained[name])}
    assert changed and all(name.startswith("encoder.layer.5.") for name in changed), changed

    ours = protocol.evaluate(seqmodel.scorer(modeldir.load_for_scoring(trained, beauty, dataset.items)), beauty)
    popularity = protocol.evaluate(baselines.popularity_scorer(beauty), beauty)
    assert ours["ndcg@10"] > popularity["ndcg@10"] and ours["recall@10"] > popularity["recall@10"]


def test_exported_encoder_reproduces_the_fine_tuned_encoder(trained, beauty, dataset, exported_encoder):
    texts = split_item_texts(beauty, dataset.items)[:300]
    torch_vectors = np.load(trained / modeldir.ITEMS_DIR / modeldir.TEXT_VECTORS_FILE)[:300]
    onnx_fp32 = OnnxEncoder(trained / modeldir.ENCODER_DIR, precision="fp32").encode(texts)
    onnx_int8 = OnnxEncoder(trained / modeldir.ENCODER_DIR, precision="int8").encode(texts)
    pretrained = OnnxEncoder(exported_encoder, precision="fp32").encode(texts)
    export_error = np.abs(onnx_fp32 - torch_vectors).max()
    assert export_error < 2e-3  # the table was computed over float16 cached states
    # The fine-tuning moved the vectors further than export rounding does:
    # an export that dropped the fine-tuned weights would fail here.
    assert np.abs(pretrained - torch_vectors).max() > 5 * export_error
    assert (onnx_int8 * onnx_fp32).sum(axis=1).mean() >= 0.99


def test_exported_user_tower_reproduces_the_torch_user_tower(trained, beauty, dataset):
    import onnxruntime as ort

    model = modeldir.load_for_scoring(trained, beauty, dataset.items)
    histories = beauty.inputs("test")[:200]
    item_matrix = model.item_matrix().detach()
    expected = model.encode_users(histories, item_matrix).detach().numpy()
    # As serving would send it: the latest max_len items' vectors, left-padded.
    batch, padding = seqmodel.left_pad(histories, model.config.max_len)
    vectors = (item_matrix[batch.clamp(min=0)] * (~padding).unsqueeze(-1)).numpy()
    mask = (~padding).numpy().astype(np.float32)
    user_tower = trained / modeldir.USER_TOWER_DIR
    inputs = {modeldir.ITEM_VECTORS: vectors, modeldir.MASK: mask}
    fp32 = ort.InferenceSession(str(user_tower / "model.onnx"), providers=["CPUExecutionProvider"])
    got = fp32.run([modeldir.SHOPPER_VECTOR], inputs)[0]
    assert got.shape == (200, item_matrix.shape[1])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    int8 = ort.InferenceSession(str(user_tower / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    quantised = int8.run([modeldir.SHOPPER_VECTOR], inputs)[0]
    cosine = (quantised * got).sum(1) / (np.linalg.norm(quantised, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.mean() >= 0.99
    metadata = json.loads((user_tower / modeldir.USER_TOWER_METADATA).read_text())
    assert metadata["max_len"] == model.config.max_len and metadata["int8_cosine_to_fp32"] >= 0.99


def test_item_vectors_with_ids_are_text_plus_id(trained):
    manifest = json.loads((trained / modeldir.MANIFEST).read_text())
    assert manifest["id_vectors"] is True
    ids = np.load(trained / modeldir.ITEMS_DIR / modeldir.ID_VECTORS_FILE)
    item_ids = json.loads((trained / modeldir.ITEMS_DIR / modeldir.ITEM_IDS_FILE).read_text())
    assert ids.shape == (len(item_ids), manifest["encoder"]["dimension"]) and np.abs(ids).max() > 0


def test_train_register_adds_the_model_directory_as_a_sequence_version(trained, dataset):
    """`recsys train --register`: the directory as the next version, its data
    window the category's events, its metrics the best validation figures."""
    from recsys_core.models.registry import Registry

    (version,) = Registry(trained.parent / "registry").versions("sequence")
    assert (version.path / "manifest.json").read_text() == (trained / "manifest.json").read_text()
    beauty = dataset.interactions[dataset.interactions.category == "Beauty"]
    window = version.manifest["data_window"]
    assert window["events"] == len(beauty) and window["shoppers"] == beauty.user_id.nunique()
    assert window["categories"] == ["Beauty"] and window["first_event"] < window["last_event"]
    best = json.loads((trained / "manifest.json").read_text())["training"]["best_valid"]
    assert version.manifest["metrics"]["valid"] == best and version.manifest["parent"] is None
    assert Registry(trained.parent / "registry").promoted("sequence") is None


def test_train_rejects_bad_arguments(capsys):
    from training import commands

    with pytest.raises(SystemExit):
        commands.train_main(["--data", str(paths.BUNDLED_DATA_DIR), "--categories", "Shoes", "--out", "/tmp/x"])
    assert "Shoes" in capsys.readouterr().err


def test_sampled_negatives_keep_each_target_its_own_logit():
    """With every item drawn the sampled softmax is the full one; with fewer
    negatives it can only be easier (the target is always a candidate)."""
    config = seqmodel.SeqConfig(dim=16, dropout=0.0)
    model = seqmodel.SequentialRecommender(30, config)
    inputs, _ = seqmodel.left_pad([np.array([1, 2, 3]), np.array([4, 5])], config.max_len, shortest=True)
    targets, _ = seqmodel.left_pad([np.array([2, 3, 7]), np.array([5, 9])], config.max_len, shortest=True)
    model.eval()
    full, positions = model.next_item_loss(inputs, targets)
    torch.manual_seed(0)
    config.negatives = 3000
    every, _ = model.next_item_loss(inputs, targets)
    config.negatives = 5
    few, _ = model.next_item_loss(inputs, targets)
    assert positions == 5
    assert every.item() == pytest.approx(full.item(), rel=1e-5)
    assert few.item() < full.item()
