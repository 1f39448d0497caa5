"""Reproduce docs/results.md: every baseline and our model on the published
protocol, transfer to a category never trained on, and cross-category.

    python scripts/results.py --category Beauty --transfer-from Sports_and_Outdoors Toys_and_Games \
        --cross Sports_and_Outdoors:Beauty Toys_and_Games:Beauty --minutes 25

Each step's figures are merged into docs/results/results.json as soon as it
finishes, so a long run that is stopped keeps what it measured, and two runs
with different --steps can go at once; --resume skips steps already there.
The report is rendered from that file.

Steps: `baselines`, `sasrec` (the first SASRec runs), `sasrec-recipe`
(SASRec on its re-evaluations' recipe, seqmodel.sasrec_config; with
`--sasrec-text`, item text as a side feature), `frozen` (the earlier model: frozen int8
MiniLM embeddings through a learned projection), `finetuned` (our model:
the MiniLM fine-tuned, `recsys train`), `transfer` (both models' transfer
rows), `cross`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from recsys_core.data import shopping, paths  # noqa: E402
from recsys_core.signals.interests import DriftSettings  # noqa: E402
from training import (  # noqa: E402
    baselines, commands, crosscat, interests_eval, modeldir, protocol, seqmodel, textmodel, twotower,
)
from training.commands import torch_threads  # noqa: E402
from training.items import default_encoder  # noqa: E402

log = logging.getLogger("results")
RESULTS = REPO_ROOT / "docs" / "results" / "results.json"
MODELS = REPO_ROOT / "var" / "results" / "models"
FINETUNED = REPO_ROOT / "var" / "results" / "finetuned"
# Sports and Toys together are 30k items: in-batch plus this many sampled
# negatives instead of a softmax over all of them keeps pretraining in budget.
PRETRAIN_NEGATIVES = 2048
# Neither a source nor a measured category: transfer variants are compared on
# its validation split, so that the category measured is never looked at.
HELDOUT_CATEGORY = "Office_Products"
STEPS = ("baselines", "sasrec", "sasrec-recipe", "frozen", "finetuned", "transfer", "cross")


def decay_label(sources: str) -> str:
    return f"MiniLM and projection frozen, user tower: recency mix with its decay chosen on {sources} validation"


def tuning_label(finetune_layers: int, mix_only: bool = False) -> str:
    if mix_only:
        return "MiniLM and projection frozen, user tower: recency mix learned"
    if finetune_layers == 0:
        return "MiniLM frozen, projection trained"
    return f"top {finetune_layers} MiniLM layer{'s' if finetune_layers != 1 else ''} fine-tuned"


def record(results: dict, key: str, value: dict) -> None:
    """Into `results` and the file, merged with what another run wrote there meanwhile."""
    results[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored[key] = value
    stored["_commands"] = list(dict.fromkeys(stored.get("_commands", []) + results.get("_commands", [])))
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=2))
    tmp.replace(RESULTS)
    log.info("%s: %s", key, {k: round(v, 4) if isinstance(v, float) else v for k, v in value.get("test", value).items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir())
    parser.add_argument("--category", help="the category measured (required unless --render)")
    parser.add_argument("--transfer-from", nargs="*", default=[])
    parser.add_argument("--cross", nargs="*", default=[], help="SOURCE:TARGET pairs")
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget per model")
    parser.add_argument("--finetuned-minutes", type=float, help="budget of our fine-tuned model on the category (default: --minutes)")
    parser.add_argument("--pretrain-minutes", type=float, help="budget of the fine-tuned model's pretraining for transfer")
    parser.add_argument("--transfer-minutes", type=float, help="budget of fine-tuning the pretrained model on the category")
    parser.add_argument("--finetune-layers", type=int, default=twotower.TwoTowerConfig.finetune_layers)
    parser.add_argument("--encoder-batch", type=int, default=twotower.TwoTowerConfig.encoder_batch,
                        help="items re-encoded with gradient per step")
    parser.add_argument("--id-lr", type=float, help="our model on the category: learning rate of its ID vectors")
    parser.add_argument("--encoder-lr", type=float, help="our model on the category: learning rate of the fine-tuned MiniLM layers")
    parser.add_argument("--no-ids", action="store_true", help="our model on the category: text only")
    parser.add_argument("--negatives", type=int, default=0,
                        help="our model on the category: 0 for a softmax over every item, N for in-batch plus N sampled")
    parser.add_argument("--transfer-user-tower", choices=("full", "mix", "decay"), default="full",
                        help="pretraining for transfer: the whole model (text only); only the user tower's "
                             "recency mix and scale, with the item tower and the correction frozen; or no "
                             "gradient step at all, the mix's recency decay chosen on the sources' validation NDCG@10")
    parser.add_argument("--pretrain-negatives", type=int, default=PRETRAIN_NEGATIVES,
                        help="pretraining for transfer: 0 for a softmax over every item, N for in-batch plus N sampled")
    parser.add_argument("--heldout-category", default=HELDOUT_CATEGORY,
                        help="zero-shot transfer models are chosen on this category's validation split")
    parser.add_argument("--sasrec-text", action="store_true",
                        help="sasrec-recipe: the items' frozen MiniLM vectors as a side feature")
    parser.add_argument("--sasrec-dropout", type=float, default=seqmodel.SeqConfig.dropout,
                        help="sasrec-recipe: dropout")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--render", action="store_true", help="only write docs/results.md from what was measured")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        render(json.loads(RESULTS.read_text()))
        return 0
    if not args.category:
        parser.error("--category is required")
    torch_threads(args.threads)

    results = json.loads(RESULTS.read_text()) if args.resume and RESULTS.is_file() else {}
    results["_commands"] = results.get("_commands", []) + ["python scripts/results.py " + " ".join(sys.argv[1:])]
    dataset = shopping.Dataset.load(args.data)
    encoder = default_encoder()
    category = args.category
    split = protocol.category_split(dataset.interactions, dataset.items, category)
    text = textmodel.text_tensor(split, dataset.items, encoder)

    def done(key: str) -> bool:
        return key in results

    for name, make in (
        ("popularity", lambda: baselines.popularity_scorer(split)),
        ("cooccurrence", lambda: baselines.cooccurrence_scorer(split)),
        ("zero-shot (pretrained encoder)", lambda: baselines.zero_shot_scorer(split, text.numpy())),
        # The query serving forms for a shopper (long- and short-term interest
        # mixed by the drift score; docs/profiles.md), on the same encoder.
        ("zero-shot, drift-aware query (pretrained encoder)",
         lambda: interests_eval.query_scorer(interests_eval.workload_of(split, dataset.items), DriftSettings())),
    ):
        key = f"{category}/{name}"
        if "baselines" in args.steps and not done(key):
            record(results, key, {"test": protocol.evaluate(make(), split)})
    if "baselines" in args.steps:
        # What serving answers without a trained model: the ranking service's
        # formula over the pretrained encoder, with and without co-purchases.
        index = None
        for name, co_purchase in (("ranking service, text and popularity (pretrained encoder)", 0.0),
                                  ("ranking service with co-purchases (pretrained encoder)", None)):
            key = f"{category}/{name}"
            if not done(key):
                index = index or crosscat.training_copurchases(dataset.interactions)
                scorer = crosscat.category_scorer(split, index, text.numpy(), crosscat.serving_weights(co_purchase))
                record(results, key, {"test": protocol.evaluate(scorer, split, with_users=True),
                                      "valid": protocol.evaluate(scorer, split, "valid", with_users=True)})

    def train(key: str, model: seqmodel.SequentialRecommender, on: protocol.CategorySplit) -> seqmodel.SequentialRecommender:
        model.config.max_minutes = args.minutes
        fit = seqmodel.fit(model, on, model.config, progress=False)
        record(results, key, {
            "test": protocol.evaluate(seqmodel.scorer(model), on) if on is split else {},
            "valid": fit.best_valid, "epochs": fit.epochs, "minutes": round(fit.seconds / 60, 1),
            "losses": fit.losses, "valid_history": fit.valid_history, "epoch_seconds": fit.epoch_seconds,
            "max_epochs": model.config.max_epochs, "patience": model.config.patience,
        })
        return model

    key = f"{category}/SASRec (our run, full softmax)"
    if "sasrec" in args.steps and not done(key):
        train(key, seqmodel.SequentialRecommender(split.num_items, seqmodel.SeqConfig()), split)

    recipe = ", item text (frozen MiniLM)" if args.sasrec_text else ""
    if args.sasrec_dropout != seqmodel.SeqConfig.dropout:
        recipe += f", dropout {args.sasrec_dropout:g}"
    key = f"{category}/SASRec (full softmax, patience {seqmodel.SASREC_PATIENCE}{recipe})"
    if "sasrec-recipe" in args.steps and not done(key):
        config = seqmodel.sasrec_config(text=args.sasrec_text, dropout=args.sasrec_dropout)
        train(key, seqmodel.sasrec(split.num_items, config, text if args.sasrec_text else None), split)

    key = f"{category}/ours: text + ID, trained on {category}"
    if "frozen" in args.steps and not done(key):
        model = train(key, textmodel.build(split, text, seqmodel.SeqConfig(use_text=True, use_ids=True)), split)
        textmodel.save(model, split, MODELS / category, {"encoder_fingerprint": encoder.fingerprint})

    def finetuned(key: str, categories: list[str], out: Path, minutes: float, init: Path | None = None,
                  **config) -> None:
        """Our model as `recsys train` trains it; test figures on `category`
        (transfer: before fine-tuning too), recorded in the model's manifest as well."""
        config = {"negatives": args.negatives, **config}
        settings = twotower.TwoTowerConfig(finetune_layers=args.finetune_layers, encoder_batch=args.encoder_batch,
                                           max_minutes=minutes, eval_every=1, **config)
        model, trained_on, fit = commands.train(dataset, categories, out, settings, init=init, progress=False,
                                                manifest={"data": str(args.data)})
        measured = {"epochs": fit.epochs, "minutes": round(fit.seconds / 60, 1), "epoch_seconds": fit.epoch_seconds,
                    "losses": fit.losses, "valid_history": fit.valid_history, "valid": fit.best_valid,
                    "model_dir": str(out.relative_to(REPO_ROOT))}
        if trained_on.category == category:
            record(results, key, {"test": protocol.evaluate(seqmodel.scorer(model), split), **measured})
        else:
            zero_shot = modeldir.load_for_scoring(out, split, dataset.items)
            record(results, key, {"test": protocol.evaluate(seqmodel.scorer(zero_shot), split),
                                  "source_valid": fit.best_valid, **{k: v for k, v in measured.items() if k != "valid"}})
        manifest = json.loads((out / modeldir.MANIFEST).read_text())
        manifest.setdefault("test", {})[category] = results[key]["test"]
        (out / modeldir.MANIFEST).write_text(json.dumps(manifest, indent=2))

    layers = tuning_label(args.finetune_layers)
    softmax = f"{args.negatives} sampled negatives" if args.negatives else "full softmax"
    variant = ("text only" if args.no_ids else "text + ID") + f" ({softmax}" + (
        f", ID lr {args.id_lr:g}" if args.id_lr else "") + (f", encoder lr {args.encoder_lr:g})" if args.encoder_lr else ")")
    key = f"{category}/ours ({layers}): {variant}, trained on {category}"
    if "finetuned" in args.steps and not done(key):
        suffix = (f"-top-{args.finetune_layers}-layers" if args.finetune_layers != 1 else "") + (
            "-text-only" if args.no_ids else "") + (f"-id-lr-{args.id_lr:g}" if args.id_lr else "") + (
            f"-encoder-lr-{args.encoder_lr:g}" if args.encoder_lr else "") + (
            f"-{args.negatives}-negatives" if args.negatives else "-full-softmax")
        lrs = {"encoder_lr": args.encoder_lr} if args.encoder_lr else {}
        finetuned(key, [category], FINETUNED / f"{category}{suffix}", args.finetuned_minutes or args.minutes,
                  use_ids=not args.no_ids, id_lr=args.id_lr, **lrs)

    if args.transfer_from and "transfer" in args.steps:
        sources = args.transfer_from
        mix_only = args.transfer_user_tower in ("mix", "decay")
        # Models of other item towers keep their own directories (the first, the top layer fine-tuned, had none).
        if args.transfer_user_tower == "decay":
            key = f"{category}/ours ({decay_label('+'.join(sources))}): text only, zero-shot"
            if not done(key):
                record(results, key, decay_transfer(dataset, sources, split))
        full_softmax = args.pretrain_negatives == 0
        tuning = (f"-top-{args.finetune_layers}-layers" if args.finetune_layers != 1 else "") + (
            "-mix-only" if mix_only else "") + ("-full-softmax" if full_softmax else "")
        source_dir = FINETUNED / ("+".join(sources) + tuning)
        label = tuning_label(args.finetune_layers, mix_only)
        text_only = "text only (full softmax)" if full_softmax else "text only"
        key = f"{category}/ours ({label}): {text_only}, trained on {'+'.join(sources)}, zero-shot"
        if args.transfer_user_tower == "decay":
            pass  # no pretraining and no fine-tuning from it: the row above is the whole variant
        elif not done(key):
            frozen = {"correction": False, "encoder_lr": 0.0} if mix_only else {}
            finetuned(key, sources, source_dir, args.pretrain_minutes or args.minutes, use_ids=False,
                      negatives=args.pretrain_negatives, **frozen)
        key = f"{category}/ours ({label}): pretrained on {'+'.join(sources)}, fine-tuned on {category} (text + ID)"
        if args.transfer_user_tower != "decay" and not done(key):
            finetuned(key, [category], FINETUNED / f"{'+'.join(sources)}{tuning}-then-{category}",
                      args.transfer_minutes or args.minutes, init=source_dir)
        heldout = protocol.category_split(dataset.interactions, dataset.items, args.heldout_category)
        for key, value in list(results.items()):
            if (key.startswith(f"{category}/ours") and key.endswith("zero-shot") and value.get("model_dir")
                    and "heldout_valid" not in value):
                model = modeldir.load_for_scoring(REPO_ROOT / value["model_dir"], heldout, dataset.items)
                measured = protocol.evaluate(seqmodel.scorer(model), heldout, "valid")
                record(results, key, {**value, "heldout_valid": {"category": args.heldout_category, **measured}})

    if args.transfer_from and "transfer" in args.steps:
        sources = args.transfer_from
        source_split = protocol.category_split(dataset.interactions, dataset.items, sources)
        source_dir = MODELS / "+".join(sources)
        key = f"{category}/ours: text only, trained on {'+'.join(sources)}, zero-shot"
        if not done(key):
            source_text = textmodel.text_tensor(source_split, dataset.items, encoder)
            source_model = textmodel.build(source_split, source_text, seqmodel.SeqConfig(use_text=True, use_ids=False))
            source_model.config.max_minutes = args.minutes
            fit = seqmodel.fit(source_model, source_split, source_model.config, progress=False)
            textmodel.save(source_model, source_split, source_dir, {"encoder_fingerprint": encoder.fingerprint})
            zero_shot = textmodel.transfer(source_model, split, text, use_ids=False)
            record(results, key, {"test": protocol.evaluate(seqmodel.scorer(zero_shot), split),
                                  "source_valid": fit.best_valid, "epochs": fit.epochs,
                                  "minutes": round(fit.seconds / 60, 1)})
        key = f"{category}/ours: pretrained on {'+'.join(sources)}, fine-tuned on {category} (text + ID)"
        if not done(key):
            source_model = textmodel.load(source_dir, split, text)
            train(key, textmodel.transfer(source_model, split, text, use_ids=True), split)

    text_vectors: dict[Path, dict[str, np.ndarray]] = {}
    cross_tasks = {}
    for pair in args.cross if "cross" in args.steps else []:
        source, target = pair.split(":")
        task = protocol.cross_category_task(dataset.interactions, dataset.items, source, target)
        cross_text = textmodel.text_tensor(task.split, dataset.items, encoder)
        popularity = baselines.target_popularity(dataset.interactions, dataset.items, task)
        cross_tasks[pair] = (task, cross_text.numpy(), popularity)
        scorers = {
            "popularity in target": baselines.fixed_scorer(popularity),
            "zero-shot (pretrained encoder)": baselines.zero_shot_scorer(task.split, cross_text.numpy()),
        }
        for source_dir in sorted(MODELS.glob("*+*")):
            scorers[f"ours: text only, trained on {source_dir.name}"] = seqmodel.scorer(
                textmodel.load(source_dir, task.split, cross_text))
        for source_dir in sorted(d for d in FINETUNED.glob("*+*") if modeldir.is_model_dir(d) and "-then-" not in d.name):
            config = modeldir.config_of(source_dir)
            manifest = modeldir.read_manifest(source_dir)
            trained_on = "+".join(manifest["categories"])
            if "chosen_decay" in manifest:
                name = f"ours ({decay_label(trained_on)}): text only"
            else:
                mix_only = not config.correction and config.encoder_lr == 0
                name = f"ours ({tuning_label(config.finetune_layers, mix_only)}): text only, trained on {trained_on}"
            if done(f"cross {source}->{target}/{name}"):
                continue
            if source_dir not in text_vectors:
                # Encoded once per model over the catalogues its runs already
                # cached the frozen layers' states for; every pair looks items up there.
                covering = [protocol.category_split(dataset.interactions, dataset.items, c)
                            for c in [args.category, manifest["categories"]]]
                text_vectors[source_dir] = {item_id: vector for c in covering for item_id, vector in
                                            zip(c.item_ids, modeldir.encode_items(source_dir, c, dataset.items).numpy())}
            scorers[name] = seqmodel.scorer(modeldir.load_for_scoring(
                source_dir, task.split, dataset.items, text_vectors=text_vectors[source_dir]))
        for name, scorer in scorers.items():
            key = f"cross {source}->{target}/{name}"
            if not done(key):
                record(results, key, {"test": protocol.evaluate_cross(scorer, task), "users": len(task.split.users)})
    if cross_tasks and not done(CO_PURCHASE_SEARCH):
        serving_ranking_on_cross(results, dataset, cross_tasks)
    return 0


CO_PURCHASE_SEARCH = "_co_purchase_weight_search"
CO_PURCHASE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


TRANSFER_DECAYS = (0.3, 0.6, 1.0, 1.5, 2.5, 4.0)


def decay_transfer(dataset: shopping.Dataset, sources: list[str], split: protocol.CategorySplit) -> dict:
    """Our model with the item tower and the user tower's correction frozen
    and no gradient step: its recency decay is the one of TRANSFER_DECAYS
    with the best validation NDCG@10 on the source categories (next-item
    cross-entropy prefers a flatter mix than NDCG@10 does, so training the
    decay moved it the wrong way; docs/results.md). Saved as a model
    directory like any other; zero-shot figures on `split`."""
    import math

    import torch

    source_split = protocol.category_split(dataset.interactions, dataset.items, sources)
    model = twotower.build(source_split, dataset.items, twotower.TwoTowerConfig(
        use_ids=False, correction=False, encoder_lr=0.0, max_epochs=0), progress=False)

    def set_decay(decay: float) -> None:
        model.config.recency_decay = decay
        with torch.no_grad():
            model.user.log_decay.fill_(math.log(decay))

    search = {}
    for decay in TRANSFER_DECAYS:
        set_decay(decay)
        search[decay] = protocol.evaluate(seqmodel.scorer(model), source_split, "valid")
        log.info("recency decay %g: %s validation NDCG@10 %.4f", decay, "+".join(sources), search[decay]["ndcg@10"])
    chosen = max(search, key=lambda d: search[d]["ndcg@10"])
    set_decay(chosen)
    out = FINETUNED / f"{'+'.join(sources)}-decay-chosen"
    searched = {"decay_search": {str(d): m["ndcg@10"] for d, m in search.items()}, "chosen_decay": chosen}
    modeldir.save(model, source_split, out, {"data": "source validation search", **searched})
    zero_shot = modeldir.load_for_scoring(out, split, dataset.items)
    return {"test": protocol.evaluate(seqmodel.scorer(zero_shot), split), "source_valid": search[chosen],
            **searched, "model_dir": str(out.relative_to(REPO_ROOT))}


def serving_ranking_on_cross(results: dict, dataset: shopping.Dataset, cross_tasks: dict) -> None:
    """The ranking service's scoring function on every cross-category pair,
    its co-purchase weight chosen by mean validation NDCG@10 over the pairs;
    beside it, the co-purchase counts alone."""
    index = crosscat.training_copurchases(dataset.interactions)

    def measure(pair: str, chosen, stage: str) -> dict:
        task, vectors, popularity = cross_tasks[pair]
        scorer = crosscat.cross_scorer(task, index, vectors, popularity, chosen)
        return protocol.evaluate_cross(scorer, task, stage=stage, with_users=True)

    search = {}
    for weight in CO_PURCHASE_WEIGHTS:
        search[weight] = {pair: measure(pair, crosscat.serving_weights(weight), "valid")["ndcg@10"] for pair in cross_tasks}
        log.info("co-purchase weight %g: validation NDCG@10 %s", weight, search[weight])
    chosen = max(CO_PURCHASE_WEIGHTS, key=lambda w: np.mean(list(search[w].values())))
    for pair, (task, _, _) in cross_tasks.items():
        group = f"cross {task.source}->{task.target}"
        users = len(task.split.users)
        record(results, f"{group}/ranking service, text and popularity, no co-purchases",
               {"test": measure(pair, crosscat.serving_weights(0.0), "test"), "valid": measure(pair, crosscat.serving_weights(0.0), "valid"), "users": users})
        record(results, f"{group}/co-purchases across categories alone (other shoppers)",
               {"test": measure(pair, crosscat.serving_weights(1.0, text=False), "test"), "users": users})
        record(results, f"{group}/ours: ranking service with co-purchases (weight {chosen:g}, chosen on validation)",
               {"test": measure(pair, crosscat.serving_weights(chosen), "test"), "valid": measure(pair, crosscat.serving_weights(chosen), "valid"),
                "users": users})
    record(results, CO_PURCHASE_SEARCH, {"validation_ndcg@10": {str(w): v for w, v in search.items()}, "chosen": chosen})


PUBLISHED = {
    # (Recall@10, NDCG@10) on these splits, full ranking, leave-one-out; None
    # where the figure was not copied. Papers, tables and protocols: the
    # "Published baselines" section of the page (RESULTS_TEMPLATE).
    "Beauty": {"SASRec as reported": (0.0605, 0.0318), "S3-Rec": (0.0647, 0.0327),
               "SASRec, sampled softmax, recalculated": (0.0921, 0.0531),
               "BSARec (AAAI'24)": (0.1008, 0.0611), "WEARec (AAAI'26)": (0.1041, 0.0614)},
    "Sports_and_Outdoors": {"SASRec as reported": (0.0350, 0.0192), "S3-Rec": (0.0385, 0.0204),
                            "SASRec, sampled softmax, recalculated": (0.0569, 0.0314),
                            "BSARec (AAAI'24)": (0.0612, None), "WEARec (AAAI'26)": (0.0631, 0.0367)},
    "Toys_and_Games": {"S3-Rec": (0.0700, 0.0376), "SASRec, sampled softmax, recalculated": (0.0970, 0.0580),
                       "ICSRec (WSDM'24)": (0.1055, 0.0657)},
}


def published_figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def render(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = REPO_ROOT / "docs"
    lines = []
    groups: dict[str, list[tuple[str, dict]]] = {}
    commands_run = ([results["_command"]] if "_command" in results else []) + results.get("_commands", [])
    command = "\n".join(dict.fromkeys(commands_run)) or "python scripts/results.py ..."
    for key, value in results.items():
        if key.startswith("_"):
            continue
        group, name = key.split("/", 1)
        groups.setdefault(group, []).append((name, value))
    for group, rows in groups.items():
        lines.append(f"### {group.replace('->', ' → ')}\n")
        lines.append("| model | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | MRR | trained |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, published in PUBLISHED.get(group, {}).items():
            lines.append(f"| *{name} (published)* | {published_figure(published[0])} | {published_figure(published[1])} | | | | |")
        for name, value in rows:
            m = value.get("test") or {}
            if not m:
                continue
            trained = f"{value['epochs']} epochs, {value['minutes']} min" if "epochs" in value else ""
            if value.get("epoch_seconds"):
                trained += f" ({np.median(value['epoch_seconds']) / 60:.1f} min/epoch)"
            if len(value.get("valid_history") or []) > 1:
                best_epoch = max(value["valid_history"], key=lambda h: h[1])[0]
                trained += f", best epoch {best_epoch}"
            lines.append(f"| {name} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} | "
                         f"{m['ndcg@20']:.4f} | {m['mrr']:.4f} | {trained} |")
        users = next((v["test"]["users"] for _, v in rows if v.get("test")), None)
        lines.append(f"\n{users} shoppers evaluated.\n" if users else "")

    lines.append(targets_section(groups))

    import textwrap

    from matplotlib.patches import Patch

    def colour(name: str) -> str:
        if name.endswith("(published)"):
            return "tab:orange"
        if name.startswith("ours (MiniLM frozen"):
            return "tab:blue"
        if name.startswith("ours (top"):
            return "cornflowerblue"
        return "lightsteelblue" if name.startswith("ours") else "tab:grey"

    heights = [len(rows) + len(PUBLISHED.get(group, {})) for group, rows in groups.items()]
    figure, axes = plt.subplots(len(groups), 1, figsize=(10, 0.45 * sum(heights) + 1.2 * len(groups)),
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for axis, (group, rows) in zip(axes[:, 0], groups.items()):
        published = {n: p for n, p in PUBLISHED.get(group, {}).items() if p[1] is not None}
        names = [n for n, v in rows if v.get("test")] + [f"{n} (published)" for n in published]
        values = [v["test"]["ndcg@10"] for n, v in rows if v.get("test")] + [p[1] for p in published.values()]
        axis.barh(range(len(names)), values, color=[colour(n) for n in names])
        axis.set_yticks(range(len(names)), [textwrap.fill(n, 48) for n in names], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("NDCG@10 (test, full ranking)", fontsize=8)
        axis.set_title(group.replace("->", " → "), fontsize=9)
    figure.legend(handles=[Patch(color="tab:blue", label="ours (recsys train)"),
                           Patch(color="cornflowerblue", label="ours, top MiniLM layer fine-tuned"),
                           Patch(color="lightsteelblue", label="ours, first model"),
                           Patch(color="tab:grey", label="baselines (our runs)"),
                           Patch(color="tab:orange", label="published")],
                  loc="upper right", fontsize=7)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(docs / "results.png", dpi=110)
    page = docs / "results.md"
    (docs / "results.md").write_text(RESULTS_TEMPLATE.format(command=command, tables="\n".join(lines),
                                                             ranker=kept_section(page, RANKER_HEADING),
                                                             value=kept_section(page, VALUE_HEADING),
                                                             served=kept_section(page, SERVED_HEADING),
                                                             robust=kept_section(page, ROBUST_HEADING),
                                                             limits=LIMITS.strip()))


RANKER_HEADING = "## Learned ranker"
# `recsys evaluate --served`'s figures (written by hand from its --json, beside its --plot).
SERVED_HEADING = "## As served"
# `recsys value-curve`'s figures (its table printed, pasted by hand).
VALUE_HEADING = "## Value-aware ranking"
# `recsys train` with its defaults against the untrained serving path (written by hand, commands beside).
ROBUST_HEADING = "## Robust defaults"


def kept_section(page: Path, heading: str) -> str:
    """A section another command writes (`recsys train-ranker --markdown`,
    pasted under `heading`), kept as it is when the page is rendered again."""
    if not page.is_file():
        return ""
    text = page.read_text()
    start = text.find("\n" + heading + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start + 1:end + 1 if end >= 0 else len(text)]


def targets_section(groups: dict[str, list[tuple[str, dict]]]) -> str:
    """Each target of the issue, checked against what was measured."""
    out = ["\n## Targets\n"]

    def test(rows, prefix, *contains, chosen_by: str | None = None):
        """The row chosen by its validation NDCG@10 (`chosen_by`: "valid",
        or "heldout_valid" for transfer), or else the best on test (baselines)."""
        found = [(n, v) for n, v in rows
                 if n.startswith(prefix) and all(c in n for c in contains) and v.get("test")
                 and (chosen_by is None or v.get(chosen_by))]
        if not found:
            return None
        best = max(found, key=lambda f: f[1][chosen_by]["ndcg@10"] if chosen_by else f[1]["test"]["ndcg@10"])
        return best[0], best[1]["test"]

    for group, rows in groups.items():
        if group.startswith("cross "):
            ours = test(rows, "ours", chosen_by="valid")
            zero = test(rows, "zero-shot (pretrained encoder)")
            popular = test(rows, "popularity")
            if ours and zero and popular:
                r = ours[1]["recall@10"]
                met = r > zero[1]["recall@10"] and r > 3 * popular[1]["recall@10"]
                out.append(f"- {group}: ours as served (chosen on validation), R@10 {r:.4f}, vs pretrained zero-shot "
                           f"{zero[1]['recall@10']:.4f} "
                           f"and 3× popularity-in-target {3 * popular[1]['recall@10']:.4f}: "
                           f"**{'met' if met else 'not met'}**.")
            continue
        published = PUBLISHED.get(group, {})
        strongest = max(((n, p) for n, p in published.items() if p[1] is not None), key=lambda p: p[1][1], default=None)
        ours = test(rows, "ours", chosen_by="valid")
        if strongest and ours:
            r, n = ours[1]["recall@10"], ours[1]["ndcg@10"]
            # Beaten: above every published row on each metric it gives.
            best_recall = max(p[0] for p in published.values())
            met = r > best_recall and n > strongest[1][1]
            above = [name for name, p in published.items() if r > p[0] and (p[1] is None or n > p[1])]
            out.append(f"- {group}: ours, chosen by validation NDCG@10 ({ours[0]}) {r:.4f}/{n:.4f} vs the strongest published "
                       f"({strongest[0]}) {strongest[1][0]:.4f}/{strongest[1][1]:.4f}, best published Recall@10 "
                       f"{best_recall:.4f}: **{'beaten' if met else 'not beaten'}** (above on both metrics: "
                       f"{'; '.join(above) or 'none'}).")
        transfer = test(rows, "ours", "text only", "zero-shot", chosen_by="heldout_valid")
        zero = test(rows, "zero-shot (pretrained encoder)")
        if transfer and zero:
            met = transfer[1]["ndcg@10"] > zero[1]["ndcg@10"]
            out.append(f"- {group}, zero-shot transfer, chosen by zero-shot validation NDCG@10 on {HELDOUT_CATEGORY} "
                       f"({transfer[0]}): NDCG@10 {transfer[1]['ndcg@10']:.4f} vs the "
                       f"pretrained encoder's {zero[1]['ndcg@10']:.4f}: **{'met' if met else 'not met'}**.")
    return "\n".join(out) + "\n"


RESULTS_TEMPLATE = """# Offline results

Protocol, as the published tables: per (shopper, category), events ordered by
`seq`; the last is the test target, the one before it the validation target.
Every item of the category is ranked; the items of the input sequence are left
out (S3-Rec's full-sort evaluation). Ties count against the target. Test
figures below; model selection (early stopping) used validation NDCG@10 only
(for a model trained on other categories, their validation split).

Item text: title and category path (Beauty, Toys); Sports items have only the
keywords the IDGenRec model generated from their metadata. "Published" rows
are copied from the data's README (SASRec and S3-Rec papers, and the
recalculated sampled-softmax SASRec) and from the papers named under
"Published baselines" below; every other row was measured by the commands
below on this machine (2 CPU cores), with the training time budget shown.

Three generations of our model are in the tables:

- **ours (MiniLM frozen, projection trained)**: our model as `recsys train`
  trains it by default (training/twotower.py,
  `--finetune-layers 0`). Item tower: the pretrained MiniLM's pooled
  embedding of the item text through a 384 x 384 projection trained from the
  identity; warm items add a learned ID vector (zero at the start, so a cold
  item is its text alone). User tower: starts as the pretrained encoder's
  zero-shot scorer (recency-weighted mix of the history's vectors) and
  learns a correction with a causal transformer. Next-item softmax over
  every item of the category, learned temperature, early stopping on
  validation NDCG@10. Chosen over fine-tuning MiniLM's top layer on Beauty's
  validation split (limits, below). Each run wrote a model directory
  (training/modeldir.py: ONNX encoder and user tower, fp32 and
  int8, item and ID vectors, manifest with the test figures) under
  `var/results/finetuned/`; `recsys serve --model DIR` serves it.
- **ours (top 1 MiniLM layer fine-tuned)**: the same with MiniLM's top
  transformer layer fine-tuned as well (`--finetune-layers 1`, over cached
  outputs of the five frozen layers below), encoder learning rate 5e-5
  unless the row names another. Rows with sampled negatives score against
  the batch's targets plus 4,096 uniformly sampled items (pretraining on
  Sports+Toys: 2,048); each step re-encodes 64 of the batch's target items
  with gradient, and the whole item table is re-encoded after every epoch.
- **ours: ...** (no item tower named): the first model (textmodel.py): frozen
  int8 MiniLM embeddings through a learned 64-dimensional projection, ID
  embeddings, full softmax.

"zero-shot (pretrained encoder)" is the issue's reference: a recency-weighted
mean of the history's embeddings (e^(-0.3 age)). "zero-shot, drift-aware
query" is the query the profile service forms without a trained model: long-
and short-term interest mixed by the drift score (docs/profiles.md, settings
chosen on Beauty's validation split).

Cross-category rows (history in the source category only, the shopper's
last item in the target held out, ranked among the target's items): "ours:
ranking service with co-purchases" is what serving does for such a shopper,
scored by the ranking service's own function (recsys_core/ranking/scoring.py:
the recency-weighted mix of the source items' vectors as the long-term
interest, the popularity prior, and the co-purchase count from
recsys_core/signals/copurchase.py, the profile service's GetCoPurchasedItems).
Co-purchases are counted over every shopper's training events (all but the
last two per shopper and category), each shopper's own baskets left out
when they are scored. Its weight was chosen by the mean validation NDCG@10
(the shopper's target item before the held-out one) over the three pairs,
among 0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 and 3.2: 0.4 (0.0113; 0.8: 0.0112;
0 0.0019). "co-purchases across categories alone" ranks by the count alone.

Zero-shot transfer rows are compared on a category that is neither a source
nor measured: each transfer model's zero-shot validation NDCG@10 on
Office_Products (`heldout_valid` in results.json) picks the one the targets
below use. Besides the models pretrained on Sports and Toys by gradient
(the whole model, text only), one transfer row has no gradient step: "user
tower: recency mix with its decay chosen on Sports_and_Outdoors+Toys_and_Games
validation" is our model with the item tower and the user tower's
correction frozen, its one behavioural setting, how fast the shopper's
older items fade, chosen among 0.3, 0.6, 1, 1.5, 2.5 and 4 by validation
NDCG@10 on the two source categories (`decay_search` in results.json), then
saved as a model directory and scored on Beauty zero-shot.

## Published baselines

Copied from the papers, not rerun here. Each reports Recall@10 as HR@10 (one
target per shopper: the same figure) and NDCG@10 under the protocol above:
leave-one-out (last item test, the one before it validation), ranked against
every item of the category, the shopper's history left out of the ranking,
the model chosen on validation, on S3-Rec's Beauty, Sports and Toys sequence
files (its repository's `data/Beauty.txt` etc., which FMLP-Rec's and
BSARec's code kept), as the papers and their code describe it; not
re-checked against each paper in this change. Ours are byte-identical
for Beauty and Sports; our Toys follows P5's file, the same users, items and
events as S3-Rec's, whose event order could not be checked against ours (the
data's README): Toys comparisons carry that doubt. Each figure is from its
paper's overall-comparison table; the table numbers were not checked here.

| baseline | paper | figures copied (R@10 / NDCG@10) | training |
|---|---|---|---|
| SASRec as reported | Kang & McAuley, ICDM'18; figures from S3-Rec's comparison on these splits | Beauty 0.0605 / 0.0318, Sports 0.0350 / 0.0192 | binary cross-entropy, one sampled negative per position |
| S3-Rec | Zhou et al., CIKM'20 | Beauty 0.0647 / 0.0327, Sports 0.0385 / 0.0204, Toys 0.0700 / 0.0376 | self-supervised pretraining on attributes, then next item |
| SASRec, sampled softmax, recalculated | as given in the data's README (paper not named there, not traced here) | Beauty 0.0921 / 0.0531, Sports 0.0569 / 0.0314, Toys 0.0970 / 0.0580 | softmax over sampled negatives |
| BSARec | Shin, Choi, Wi & Park, AAAI'24 (arXiv 2312.10325; code yehjin-shin/BSARec) | Beauty 0.1008 / 0.0611, Sports Recall@10 0.0612 (its NDCG@10 not copied) | self-attention with a Fourier-based inductive bias |
| WEARec | Xu, Yuan, Liu, Fang, Zhao & Zhao, AAAI'26 (arXiv 2511.07028; code xhy963319431/WEARec) | Beauty 0.1041 / 0.0614, Sports 0.0631 / 0.0367 | adaptive frequency-domain filtering and wavelet enhancement |
| ICSRec | Qin et al., WSDM'24 (arXiv 2310.14318; code QinHsiu/ICSRec) | Toys 0.1055 / 0.0657 | next item plus intent contrastive learning over subsequences |

**Our SASRec** (training/seqmodel.py). What it was trained with before
this change, found in the code: cross-entropy over every item of the
category (not the original's binary cross-entropy with one negative),
validation NDCG@10 every second epoch, patience 5, up to 200 epochs within a
wall-clock budget; dimension 64, two layers, two heads, dropout 0.5, the
latest 50 items, learning rate 1e-3, batch 256. Its rows ("SASRec (our run,
full softmax)") are those runs: Beauty stopped by patience (epoch 48),
Sports and Toys at their budgets with validation level. The recipe is now
named (`seqmodel.sasrec_config`, used by `recsys evaluate --baseline sasrec`
and `scripts/results.py --steps sasrec-recipe`): the same loss, validation
after every epoch, patience 10, a 400-epoch ceiling, and with
`--sasrec-text` the items' frozen MiniLM vectors as a side feature (through
a learned projection, added to the ID embedding). Two Beauty runs on it
(`--steps sasrec-recipe --category Beauty --minutes 42 --threads 1`, one with
`--sasrec-dropout 0.2`, one with `--sasrec-text`) were started with the
machine's load average at 11 to 18 and ran 9 minutes an epoch (the earlier
runs: under a minute); they were stopped after two epochs (validation
NDCG@10 0.0073, 0.0088 ID only at dropout 0.2; 0.0142, 0.0165 with text;
the earlier runs at epoch 2: 0.0088 ID only, 0.0155 text + ID). No test
figure came from them. On a quiet machine since (20:21 to 20:38, nothing
else running, commit 8f7cb04 and the next), the recipe with item text,
`--steps sasrec-recipe --sasrec-text --category Beauty --minutes 33
--threads 2`, ran 18 s an epoch and stopped by patience at epoch 44 (best
34, validation NDCG@10 0.0610 then level): **0.0889 / 0.0514** on test,
below the recalculated sampled-softmax SASRec (0.0921 / 0.0531), the
published WEARec and BSARec, and our two-tower (0.0963 / 0.0541). The
ID-only recipe right after (20:42 to 21:01, same machine, nothing else
running: `--steps sasrec-recipe --category Beauty --minutes 25 --threads
2`), patience-stopped at epoch 53 (best 43): **0.0792 / 0.0478**, above the
first ID-only run (0.0760 / 0.0463, patience 5 every second epoch) and
below the recalculated sampled-softmax SASRec.

Item text as a side feature on this same model was measured before: "ours:
text + ID, trained on Beauty" is seqmodel.py with text and IDs (the first
"ours" model), the same loss and early stopping (every second epoch,
patience 5) in a 23-minute budget: 0.0871 / 0.0515 against the ID-only
SASRec's 0.0760 / 0.0463, validation still level-to-rising when the budget
ended (0.0631 at epoch 32, 0.0629 at 34). Both stay below the recalculated
SASRec and the later published Beauty rows (BSARec, WEARec).

**The two-tower (our default)** already trains on this recipe: cross-entropy
over every item (`--negatives 0`), validation NDCG@10 after every epoch,
patience 5, the MiniLM item text; on Beauty it peaks at epoch 3 and stops by
patience at epoch 8, so a longer budget changes nothing. It was not
retrained in this change. Against the rows above: Beauty 0.0963 / 0.0541 is
below BSARec and WEARec; Sports 0.0576 / 0.0321 below WEARec and BSARec's
Recall@10; Toys 0.1104 / 0.0636 above ICSRec on Recall@10, below it on
NDCG@10 (Targets, below).

Reproduce (full data beside the clone):

```sh
{command}
.venv/bin/python scripts/results.py --render   # this page and results.png
```

![NDCG@10 per model](results.png)

{tables}
{ranker}{value}{served}{robust}## Limits of these figures

{limits}
"""

LIMITS = """- The item tower was chosen on Beauty's validation split, NDCG@10 per
  epoch (full softmax, ID vectors at the main learning rate 1e-3):
  MiniLM frozen with the projection trained 0.0544, 0.0650, **0.0684**,
  0.0671, 0.0652 ... (best at epoch 3); the top layer fine-tuned at encoder
  learning rate 1e-5: 0.0531, 0.0615, **0.0656**, 0.0649 ... (epoch 3); at
  5e-5 (the earlier run): 0.0368, 0.0489, 0.0540, 0.0567, **0.0605**. Every
  variant overfits after its peak while the training loss keeps falling;
  early stopping keeps the peak. A run with the ID vectors at 2e-4 fell from
  its first epoch (0.0293, then 0.0200) and was stopped; it is not in the
  tables. Toys was trained once, with the frozen-MiniLM tower, and one slip:
  the projection's learning rate ("encoder lr", 5e-5 for Beauty) was 1e-5
  for the Toys run and the Sports+Toys transfer pretraining, launched while
  the default had briefly been changed; the Toys row names it, and neither
  was rerun. Sports got a small search of its own (next item).
- Sports: four variants, chosen on Sports' own validation NDCG@10 (best
  epoch): MiniLM frozen with the projection at 5e-5 0.0374 (the Beauty
  choice, run first), at 2e-4 0.0348, at 1e-5 **0.0397**, and the top layer
  fine-tuned at 1e-5 0.0360. The chosen one scores 0.0576/0.0321 on test;
  the first, run alone, would have missed the target (0.0560/0.0310). The
  search was made after that first test figure had been seen; the choice
  itself is by validation only. Sports' item text is the IDGenRec keywords
  only; its pretrained zero-shot is the weakest of the three (0.0171).
  Beauty was not rerun with the projection at 1e-5.
- Training budgets are wall-clock minutes (`--minutes`, `--finetuned-minutes`,
  `--pretrain-minutes`, `--transfer-minutes`) on two CPU cores, one torch
  thread per run and usually two runs at once; the minutes per epoch in the
  tables are wall-clock under that load. The first fine-tuned rows (top 1
  layer, 5e-5) were trained with the load average at 8 to 11, about a quarter
  of a core each.
- Our SASRec runs (full softmax, dimension 64, two layers; validation
  NDCG@10 every second epoch, patience 5). Beauty was rerun with a 45-minute
  budget after denormal floats were flushed (`torch_threads`; the first run,
  before that fix, reached 0.0700/0.0430 in 22 minutes while still
  improving): it stopped by patience at epoch 48 (31.5 minutes), validation
  NDCG@10 level since epoch 34 (0.0565, 0.0562, 0.0567 at epoch 38, then
  0.0563 ... 0.0558). Sports was rerun with 50 minutes (the first run,
  30 minutes, 0.0372/0.0223, was still rising): validation NDCG@10 0.0300,
  0.0302, 0.0301, 0.0309 (epoch 32), 0.0302, 0.0299 at epochs 26 to 36, so
  levelled off when the budget ended. Toys (30 minutes) had levelled off as
  well (0.0581, 0.0579, 0.0578 over its last epochs). The three runs still
  fall short of the published recalculated SASRec (sampled softmax, its own
  tuning) and of every later published row; our SASRec was not tuned beyond
  these defaults (Published baselines, above).
- Sampled against full softmax, on Beauty with the top layer fine-tuned: with
  4,096 sampled negatives validation NDCG@10 peaked at epoch 4 (0.0586) and
  then fell every epoch (0.0460 at epoch 9); with the softmax over every item
  it reached 0.0605. Sampled negatives that always include the batch's
  targets push popular items down, which a full ranking punishes.
- Transfer with the top layer fine-tuned (one epoch over Sports and Toys,
  2,048 sampled negatives) made the Beauty zero-shot worse than the pretrained
  encoder (NDCG@10 0.0238 against 0.0302). A one-off check on Beauty's
  validation split (not in results.json) split the loss between the two
  towers: the pretrained encoder's zero-shot mix 0.0300; the pretrained
  encoder under the user tower trained on Sports and Toys 0.0287; the encoder
  fine-tuned there, zero-shot mix only 0.0275; both trained parts 0.0241.
- Why the recency decay is chosen, not trained: pretraining only the
  user tower's mix (decay and scale, item tower and correction frozen) on
  Sports and Toys moved the decay from 0.30 to 0.25 in one epoch, with
  sampled negatives and with a softmax over all 30k items alike (the latter
  stopped after that epoch, 7 minutes); with sampled negatives the sources'
  validation NDCG@10 fell each epoch (0.0195, 0.0187, 0.0181).
  Next-item cross-entropy prefers the flatter mix, NDCG@10 the sharper one:
  on 800 Toys validation shoppers (scale 20) cross-entropy was 9.01 at decay
  0.25, 9.09 at 0.6 and 10.36 at 2.5, while the zero-shot validation
  NDCG@10 was 0.0388 at 0.3 and 0.0545 at 2.5 (Sports 0.0110 and 0.0149).
  These runs (`--steps transfer --transfer-user-tower mix`, with
  `--pretrain-negatives 0` for the full softmax) were stopped and are not
  in the tables. The chosen decay, 4, is the grid's largest: validation
  was nearly flat from 1.5 on (0.0287, 0.0289, 0.0290). Beauty's own
  validation curve (0.0309 at 0.3, 0.0380 at 2.5) was also looked at in that
  check, before the decay-chosen variant was built; the variant itself sees
  only Sports and Toys, and the choice among transfer rows is made on
  Office_Products.
- Cross-category before co-purchases: no text model came near 3x
  popularity-in-target (the "zero-shot" and "ours ... text only" cross
  rows, R@10 0.0006 to 0.0025, below popularity itself). Item text says
  little about which toy a skin-care shopper buys next. The co-purchase
  counts come from the 1,625 to 2,073 shoppers active in both categories of
  a pair (the README of the data), which limits them: Toys -> Beauty and
  Beauty -> Toys stay below 3x popularity. Variants tried in a scratch
  script before the one in serving (none beat it on validation by much):
  counts weighted by the inverse log of the source item's shoppers;
  shopper-to-shopper cosine over the source items (and over source items
  expanded by their within-category co-occurrence), then those shoppers'
  target items; blends with popularity and the text mix. They reached test
  R@10 0.012 to 0.018 across the three pairs.
- The same scoring in the category itself (rows "ranking service ...
  (pretrained encoder)"): the co-purchase term lifts what serving answers
  without a trained model above the text and popularity alone, but not to
  the item-to-item co-occurrence baseline, which weighs the items that
  directly followed the latest ones. Its weight (0.4) was chosen on the
  cross pairs only; a scratch check on 6,000 Beauty shoppers' validation
  targets gave NDCG@10 0.0345 at weight 0, 0.0497 at 0.1, 0.0512 at 0.2
  and 0.0510 at 0.4.
- Serving precision, a one-off check (not in results.json): with the item
  table computed by the exported int8 encoder instead of the fp32 one, the
  fine-tuned text + ID model (top layer, 4,096 sampled negatives) scored R@10
  0.0860 / NDCG@10 0.0472 on Beauty's test split (fp32: 0.0837 / 0.0458):
  int8 holds its accuracy. The exported fp32 encoder matches the torch
  encoder to 3e-5, the user tower's int8 ONNX keeps a cosine of 0.99999 to
  fp32.
"""


if __name__ == "__main__":
    sys.exit(main())
