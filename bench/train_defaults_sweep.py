"""The validation sweep behind `recsys train`'s defaults (docs/results.md,
"Robust defaults"): variants of the regularisation and learning-rate
schedule, each trained with early stopping on one category's validation
split; prints each variant's best validation Recall@10 / NDCG@10 and epoch,
and the untrained serving path's on the same targets. No test figure is read.

    PYTHONPATH=. python bench/train_defaults_sweep.py --category Office_Products --max-minutes 4
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import replace

from recsys_core.data import paths, shopping
from training import commands, guard, protocol, seqmodel, twotower

VARIANTS = {
    "before (no schedule, no ID regularisation)": dict(warmup_steps=0, plateau_factor=1.0, id_weight_decay=0.0,
                                                       id_dropout=0.0),
    "reduce-on-plateau 0.5": dict(warmup_steps=0, plateau_factor=0.5, id_weight_decay=0.0, id_dropout=0.0),
    "plateau + ID weight decay 0.1": dict(warmup_steps=0, plateau_factor=0.5, id_weight_decay=0.1, id_dropout=0.0),
    "plateau + ID dropout 0.1": dict(warmup_steps=0, plateau_factor=0.5, id_weight_decay=0.0, id_dropout=0.1),
    "warmup 20 + plateau + ID decay 0.1 + ID dropout 0.2": dict(warmup_steps=20, plateau_factor=0.5,
                                                             id_weight_decay=0.1, id_dropout=0.2),
    "defaults": {},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(paths.shared_data_dir()))
    parser.add_argument("--category", required=True)
    parser.add_argument("--max-minutes", type=float, default=4.0, help="per variant")
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    commands.torch_threads(1)
    dataset = shopping.Dataset.load(args.data)
    split = protocol.category_split(dataset.interactions, dataset.items, args.category)
    start = twotower.build(split, dataset.items, twotower.TwoTowerConfig(), progress=False)
    untrained = guard.untrained_valid(split, dataset.items, start.items.table.numpy())
    print(json.dumps({"untrained path": {m: round(untrained[m], 4) for m in guard.METRICS}}), flush=True)
    for name in args.variants:
        model = copy.deepcopy(start)
        model.config = config = replace(twotower.TwoTowerConfig(), max_minutes=args.max_minutes,
                                        max_epochs=args.max_epochs, **VARIANTS[name])
        model.items.id_dropout = config.id_dropout
        result = seqmodel.fit(model, split, config, progress=False)
        print(json.dumps({"variant": name, "best_epoch": result.best_epoch, "epochs": result.epochs,
                          "valid": {m: round(result.best_valid[m], 4) for m in guard.METRICS},
                          "history": [(e, round(v, 4)) for e, v in result.valid_history]}), flush=True)


if __name__ == "__main__":
    main()
