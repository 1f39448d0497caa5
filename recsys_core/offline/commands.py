"""`recsys evaluate` and `recsys train`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from recsys_core import data, paths
from recsys_core.offline import baselines, protocol, seqmodel, textmodel
from recsys_core.offline.items import default_encoder, split_item_vectors

log = logging.getLogger(__name__)
BASELINES = ("popularity", "cooccurrence", "zero-shot", "sasrec")


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir(),
                        help="directory in the amazon-2014 schema (default: ../shared/data/amazon-2014)")


def torch_threads() -> None:
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def baseline_scorer(name: str, split: protocol.CategorySplit, items, sasrec_minutes: float):
    if name == "popularity":
        return baselines.popularity_scorer(split)
    if name == "cooccurrence":
        return baselines.cooccurrence_scorer(split)
    if name == "zero-shot":
        return baselines.zero_shot_scorer(split, split_item_vectors(split, items, default_encoder()))
    if name == "sasrec":
        torch_threads()
        config = seqmodel.SeqConfig(max_minutes=sasrec_minutes)
        model = seqmodel.SequentialRecommender(split.num_items, config)
        seqmodel.fit(model, split, config)
        return seqmodel.scorer(model)
    raise ValueError(name)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys evaluate", description=(
        "Leave-one-out by seq, full ranking over every item of the category "
        "(history items left out), Recall/NDCG@10 and @20 and MRR."))
    add_data_argument(parser)
    parser.add_argument("--category", action="append", help="category (repeatable; default: every one)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model directory written by `recsys train`")
    source.add_argument("--baseline", choices=BASELINES)
    parser.add_argument("--stage", choices=("test", "valid"), default="test")
    parser.add_argument("--sasrec-minutes", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    dataset = data.Dataset.load(args.data)
    categories = args.category or sorted(dataset.interactions.category.unique())
    results = {}
    for category in categories:
        split = protocol.category_split(dataset.interactions, dataset.items, category)
        if args.model:
            torch_threads()
            text = textmodel.text_tensor(split, dataset.items, default_encoder())
            scorer = seqmodel.scorer(textmodel.load(args.model, split, text))
            name = str(args.model)
        else:
            scorer = baseline_scorer(args.baseline, split, dataset.items, args.sasrec_minutes)
            name = args.baseline
        results[category] = protocol.evaluate(scorer, split, args.stage, progress=f"{category} {name}")
    if args.json:
        print(json.dumps({"stage": args.stage, "results": results}, indent=2))
    else:
        print(f"{'category':<22} {'R@10':>7} {'N@10':>7} {'R@20':>7} {'N@20':>7} {'MRR':>7} {'users':>7}")
        for category, m in results.items():
            print(f"{category:<22} {m['recall@10']:7.4f} {m['ndcg@10']:7.4f} {m['recall@20']:7.4f} "
                  f"{m['ndcg@20']:7.4f} {m['mrr']:7.4f} {m['users']:7d}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys train", description=(
        "Train our model: the encoder's item text through a learned projection "
        "(plus ID embeddings for the catalogue trained on) and a causal "
        "transformer over the shopper's history, full-softmax next-item loss, "
        "early stopping on validation NDCG@10."))
    add_data_argument(parser)
    parser.add_argument("--categories", nargs="+", required=True, help="categories trained on, jointly")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, help="start from this model's user tower and projection (transfer)")
    parser.add_argument("--no-ids", action="store_true", help="text only: a model meant to transfer")
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch_threads()

    dataset = data.Dataset.load(args.data)
    split = protocol.category_split(dataset.interactions, dataset.items, args.categories)
    encoder = default_encoder()
    text = textmodel.text_tensor(split, dataset.items, encoder)
    config = seqmodel.SeqConfig(dim=args.dim, use_text=True, use_ids=not args.no_ids,
                                max_minutes=args.max_minutes, max_epochs=args.max_epochs, seed=args.seed)
    if args.init:
        model = textmodel.transfer(textmodel.load(args.init, split, text), split, text, use_ids=not args.no_ids)
        model.config.max_minutes, model.config.max_epochs = args.max_minutes, args.max_epochs
    else:
        model = textmodel.build(split, text, config)
    started = time.monotonic()
    result = seqmodel.fit(model, split, model.config)
    textmodel.save(model, split, args.out, {
        "encoder_fingerprint": encoder.fingerprint,
        "data": str(args.data),
        "train_seconds": round(time.monotonic() - started, 1),
        "epochs": result.epochs,
        "losses": result.losses,
        "valid_history": result.valid_history,
        "best_valid": result.best_valid,
        "init": str(args.init) if args.init else None,
    })
    print(json.dumps({"out": str(args.out), "epochs": result.epochs, "best_valid": result.best_valid,
                      "first_loss": result.losses[0], "last_loss": result.losses[-1]}, indent=2))
    return 0
