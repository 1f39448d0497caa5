"""`recsys evaluate` and `recsys train`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from recsys_core.data import shopping, paths
from training import baselines, crosscat, distributed, guard, modeldir, protocol, seqmodel, textmodel, twotower, versions
from training.items import default_encoder, split_item_vectors

log = logging.getLogger(__name__)
# "untrained": the query serving forms without a trained model (training/guard.py).
BASELINES = ("popularity", "cooccurrence", "zero-shot", "untrained", "sasrec", "ranking")
# What --cross can score: ID-based models know no other category's items.
CROSS_BASELINES = ("popularity", "zero-shot", "ranking")


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir(),
                        help="directory in the amazon-2014 schema (default: ../shared/data/amazon-2014)")


def torch_threads(threads: int | None = None, processes: int = 1) -> None:
    """`threads` torch threads (default: every core, shared among the
    `processes` training on this machine; long runs on a shared machine pass
    1). Denormal floats are flushed to zero: a softmax over thousands of
    items, once peaked, fills its gradient with them, and they made a
    backward pass 25 times slower here."""
    import os

    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // processes))
    torch.set_flush_denormal(True)


def baseline_scorer(name: str, split: protocol.CategorySplit, items, sasrec_minutes: float, interactions=None,
                    sasrec_text: bool = False):
    """The baseline's scorer; "ranking" (the ranking service's scoring with
    co-purchases, over the pretrained encoder) takes (histories, shoppers);
    `sasrec_text`: SASRec with the items' frozen MiniLM vectors as a side feature."""
    if name == "ranking":
        return crosscat.category_scorer(split, crosscat.training_copurchases(interactions),
                                        split_item_vectors(split, items, default_encoder()), crosscat.serving_weights())
    if name == "popularity":
        return baselines.popularity_scorer(split)
    if name == "cooccurrence":
        return baselines.cooccurrence_scorer(split)
    if name == "zero-shot":
        return baselines.zero_shot_scorer(split, split_item_vectors(split, items, default_encoder()))
    if name == "untrained":
        return guard.untrained_scorer(split, items, split_item_vectors(split, items, default_encoder()))
    if name == "sasrec":
        import torch

        torch_threads()
        config = seqmodel.sasrec_config(text=sasrec_text, max_minutes=sasrec_minutes)
        text = torch.from_numpy(split_item_vectors(split, items, default_encoder())) if sasrec_text else None
        model = seqmodel.sasrec(split.num_items, config, text)
        seqmodel.fit(model, split, config)
        return seqmodel.scorer(model)
    raise ValueError(name)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys evaluate", description=(
        "Leave-one-out by seq, full ranking over every item of the category "
        "(history items left out), Recall/NDCG@10 and @20 and MRR."))
    add_data_argument(parser)
    parser.add_argument("--category", action="append", help="category (repeatable; default: every one)")
    parser.add_argument("--cross", action="append", metavar="SOURCE:TARGET",
                        help="the cross-category task instead (repeatable): shoppers of both, their history in "
                             "SOURCE only, their last item in TARGET held out, ranked among TARGET's items")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model directory written by `recsys train`")
    source.add_argument("--baseline", choices=BASELINES)
    parser.add_argument("--stage", choices=("test", "valid"), default="test")
    parser.add_argument("--sasrec-minutes", type=float, default=60.0)
    parser.add_argument("--sasrec-text", action="store_true",
                        help="--baseline sasrec: the items' frozen MiniLM vectors as a side feature")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.sasrec_text and args.baseline != "sasrec":
        parser.error("--sasrec-text goes with --baseline sasrec")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    dataset = shopping.Dataset.load(args.data)
    known = set(dataset.interactions.category.unique())
    results = {}
    if args.cross:
        if args.baseline and args.baseline not in CROSS_BASELINES:
            parser.error(f"--cross: --baseline must be one of {', '.join(CROSS_BASELINES)}")
        if args.stage != "test":
            parser.error("--cross: only --stage test (its validation targets are for choosing weights)")
        for pair in args.cross:
            source, _, target = pair.partition(":")
            if not {source, target} <= known or source == target:
                parser.error(f"--cross {pair}: two different categories of {sorted(known)}, as SOURCE:TARGET")
            results[pair] = evaluate_cross(dataset, source, target, args)
        report(results, args.json, "test")
        return 0
    categories = args.category or sorted(known)
    for category in categories:
        split = protocol.category_split(dataset.interactions, dataset.items, category)
        if args.model and modeldir.is_model_dir(args.model) and not served_by_model(args.model):
            # What `recsys serve --model` answers for a directory its guard held back.
            scorer = guard.untrained_scorer(split, dataset.items, split_item_vectors(split, dataset.items, default_encoder()))
            name = f"{args.model} (guard: untrained serving path)"
        elif args.model and modeldir.is_model_dir(args.model):
            torch_threads()
            scorer = seqmodel.scorer(modeldir.load_for_scoring(args.model, split, dataset.items))
            name = str(args.model)
        elif args.model:  # the earlier frozen-encoder model's directory (model.json)
            torch_threads()
            text = textmodel.text_tensor(split, dataset.items, default_encoder())
            scorer = seqmodel.scorer(textmodel.load(args.model, split, text))
            name = str(args.model)
        else:
            scorer = baseline_scorer(args.baseline, split, dataset.items, args.sasrec_minutes, dataset.interactions,
                                     sasrec_text=args.sasrec_text)
            name = args.baseline
        results[category] = protocol.evaluate(scorer, split, args.stage, progress=f"{category} {name}",
                                              with_users=args.baseline == "ranking")
    report(results, args.json, args.stage)
    return 0


def served_by_model(model_dir: Path) -> bool:
    from recsys_core.models import model_serving

    return model_serving.serves_model(modeldir.read_manifest(model_dir))


def evaluate_cross(dataset: shopping.Dataset, source: str, target: str, args) -> dict[str, float]:
    task = protocol.cross_category_task(dataset.interactions, dataset.items, source, target)
    if args.model:
        if not modeldir.is_model_dir(args.model):
            raise SystemExit(f"--model {args.model}: --cross needs a model directory written by `recsys train`")
        torch_threads()
        scorer = seqmodel.scorer(modeldir.load_for_scoring(args.model, task.split, dataset.items))
        return protocol.evaluate_cross(scorer, task, progress=f"{source}->{target}")
    popularity = baselines.target_popularity(dataset.interactions, dataset.items, task)
    if args.baseline == "popularity":
        return protocol.evaluate_cross(baselines.fixed_scorer(popularity), task, progress=f"{source}->{target}")
    vectors = split_item_vectors(task.split, dataset.items, default_encoder())
    if args.baseline == "zero-shot":
        return protocol.evaluate_cross(baselines.zero_shot_scorer(task.split, vectors), task,
                                       progress=f"{source}->{target}")
    scorer = crosscat.cross_scorer(task, crosscat.training_copurchases(dataset.interactions), vectors, popularity,
                                   crosscat.serving_weights())
    return protocol.evaluate_cross(scorer, task, progress=f"{source}->{target}", with_users=True)


def report(results: dict, as_json: bool, stage: str) -> None:
    if as_json:
        print(json.dumps({"stage": stage, "results": results}, indent=2))
        return
    print(f"{'category':<36} {'R@10':>7} {'N@10':>7} {'R@20':>7} {'N@20':>7} {'MRR':>7} {'users':>7}")
    for category, m in results.items():
        print(f"{category:<36} {m['recall@10']:7.4f} {m['ndcg@10']:7.4f} {m['recall@20']:7.4f} "
              f"{m['ndcg@20']:7.4f} {m['mrr']:7.4f} {m['users']:7d}")


def train(dataset: shopping.Dataset, categories: list[str], out: Path, config: twotower.TwoTowerConfig,
          init: Path | None = None, progress: bool = True, manifest: dict | None = None,
          world: distributed.World = distributed.SINGLE, with_guard: bool = False):
    """Train our model on `categories` jointly (from the model directory
    `init`, for transfer) and write the model directory `out`; returns
    (model, split, fit result). Under torchrun every rank calls this with
    its `world` (distributed.from_env()); only rank 0 writes `out`.
    `with_guard`: training/guard.py decides whether the directory serves the
    model or falls back (`recsys train` does; experiments that measure the
    trained model itself, scripts/results.py, do not)."""
    split = protocol.category_split(dataset.interactions, dataset.items, categories)
    return train_split(split, dataset.items, out, config, init, progress, manifest, world, with_guard)


def train_split(split: protocol.CategorySplit, items, out: Path, config: twotower.TwoTowerConfig,
                init: Path | None = None, progress: bool = True, manifest: dict | None = None,
                world: distributed.World = distributed.SINGLE, with_guard: bool = False):
    """`train` on a split already made (`recsys retrain` makes its own, from
    the event store's events before the holdout window, and decides on its
    holdout against the promoted version)."""
    pretrained = None
    if init:
        model = modeldir.load_for_training(init, split, items, config, progress=progress)
        if with_guard:  # the untrained path runs on the pretrained encoder, not init's
            pretrained = split_item_vectors(split, items, default_encoder(), show_progress=progress)
    else:
        model = twotower.build(split, items, config, progress=progress)
        pretrained = model.items.table.numpy().copy()  # the pretrained encoder's, as serving's encoder gives them
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if with_guard else None
    model.to(world.device)
    result = seqmodel.fit(model, split, config, progress=progress, checkpoint=modeldir.checkpoint_path(out),
                          world=world)
    model.cpu()  # the model directory is written from, and exported on, the CPU
    if world.main:
        decision = apply_guard(model, split, items, pretrained, start) if with_guard else None
        modeldir.save(model, split, out, {
            "training": {"epochs": result.epochs, "minutes": round(result.seconds / 60, 1),
                         "epoch_seconds": result.epoch_seconds, "losses": result.losses,
                         "valid_history": result.valid_history, "best_valid": result.best_valid,
                         "best_epoch": result.best_epoch, "lr_scale_at_end": result.lr_scale,
                         "init": str(init) if init else None, "world_size": world.size,
                         **({"distributed": result.distributed} if result.distributed else {})},
            **({"guard": decision} if decision else {}),
            **(manifest or {}),
        })
    return model, split, result


def apply_guard(model: twotower.TwoTowerRecommender, split: protocol.CategorySplit, items, pretrained,
                start: dict) -> dict:
    """training/guard.py's decision, on the model as it is (the best epoch's
    weights) shopper by shopper against the untrained path over the
    `pretrained` item vectors; on "untrained" the model is reset to `start`
    (its state before training) so that whatever reads the directory gets
    the untrained start rather than weights that did not win on validation."""
    trained_ranks = protocol.target_ranks(seqmodel.scorer(model), split.inputs("valid"), split.targets("valid"))
    decision = guard.decide(**guard.compare(trained_ranks, guard.untrained_ranks(split, items, pretrained)))
    if not decision["serve_model"]:
        log.warning(guard.describe(decision))
        model.load_state_dict(start)
    return decision


def train_main(argv: list[str] | None = None) -> int:
    defaults = twotower.TwoTowerConfig()
    parser = argparse.ArgumentParser(prog="recsys train", description=(
        "Train our model: the MiniLM item encoder with a trained projection "
        "after its pooling (and, with --finetune-layers N, its top N layers "
        "fine-tuned over cached states of the frozen lower ones), plus ID vectors for the "
        "catalogue trained on, and a user tower that starts as the pretrained "
        "zero-shot mix of the history and learns a correction; next-item "
        "softmax over every item (or sampled), early stopping on validation "
        "NDCG@10. Writes a versioned model directory (see training/modeldir.py)."))
    add_data_argument(parser)
    parser.add_argument("--categories", nargs="+", required=True, help="categories trained on, jointly")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--init", type=Path, help="start from this model directory's encoder and user tower (transfer)")
    parser.add_argument("--no-ids", action="store_true", help="text only: a model meant to transfer")
    parser.add_argument("--finetune-layers", type=int, default=defaults.finetune_layers,
                        help="top MiniLM layers to train (0: only the projection after pooling)")
    parser.add_argument("--encoder-batch", type=int, default=defaults.encoder_batch,
                        help="items re-encoded with gradient per step")
    parser.add_argument("--encoder-lr", type=float, default=defaults.encoder_lr)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--id-lr", type=float, help="learning rate of the ID vectors (default: --lr)")
    parser.add_argument("--negatives", type=int, default=defaults.negatives,
                        help="0: softmax over every item; N: in-batch targets plus N sampled items")
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--dim", type=int, default=defaults.dim, help="the user tower's inner width")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="torch threads (default: every core; 1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-guard", action="store_true",
                        help="write the trained model even where it does not beat the untrained serving path on "
                             "validation (by default the directory then falls back to that path: training/guard.py)")
    versions.add_register_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.finetune_layers < 0 or args.encoder_batch < 1 or args.max_minutes <= 0:
        parser.error("--finetune-layers must be >= 0, --encoder-batch >= 1 and --max-minutes > 0")
    if args.init and not modeldir.is_model_dir(args.init):
        parser.error(f"--init {args.init}: not a model directory written by `recsys train`")
    try:
        world = distributed.from_env()
    except ValueError as e:
        parser.error(str(e))
    try:
        return _train(parser, args, world)
    finally:
        distributed.shutdown(world)


def _train(parser: argparse.ArgumentParser, args, world: distributed.World) -> int:
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
    torch_threads(args.threads, world.local_size)

    dataset = shopping.Dataset.load(args.data)
    unknown = sorted(set(args.categories) - set(dataset.interactions.category.unique()))
    if unknown:
        parser.error(f"--categories: {unknown} not in {args.data}")
    config = twotower.TwoTowerConfig(
        dim=args.dim, use_ids=not args.no_ids, finetune_layers=args.finetune_layers,
        encoder_batch=args.encoder_batch, encoder_lr=args.encoder_lr, lr=args.lr, id_lr=args.id_lr, negatives=args.negatives,
        max_minutes=args.max_minutes, max_epochs=args.max_epochs, seed=args.seed)
    _, _, result = train(dataset, args.categories, args.out, config, init=args.init,
                         progress=not args.no_progress and world.main, manifest={"data": str(args.data)},
                         world=world, with_guard=not args.no_guard)
    if not world.main:
        return 0
    trained_on = dataset.interactions[dataset.interactions.category.isin(args.categories)]
    decision = modeldir.read_manifest(args.out).get("guard") or {"decision": "not checked (--no-guard)"}
    if "valid" in decision:
        print(guard.describe(decision), file=sys.stderr)
    registered = versions.register(args, "sequence", args.out, versions.data_window(trained_on),
                                   {"valid": result.best_valid, "epochs": result.epochs,
                                    "guard": decision["decision"]}, data=str(args.data))
    print(json.dumps({"out": str(args.out), "epochs": result.epochs, "best_epoch": result.best_epoch,
                      "best_valid": result.best_valid, "guard": decision["decision"],
                      "first_loss": result.losses[0], "last_loss": result.losses[-1],
                      **({"registered": registered.label} if registered else {})}, indent=2))
    return 0
