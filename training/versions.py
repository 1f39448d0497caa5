"""What every trainer records when it adds its output to the model registry
(recsys_core/models/registry.py): the data window it learned from and the
metrics it measured. `recsys train | train-ranker | train-value --register`
and `recsys retrain` all describe their data the same way, so `recsys
models` can put them side by side."""
from __future__ import annotations

import argparse
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from recsys_core.models.registry import ENV, ModelVersion, Registry

log = logging.getLogger(__name__)


def iso(ts) -> str | None:
    if ts is None or (isinstance(ts, float) and math.isnan(ts)):
        return None
    return datetime.fromtimestamp(int(ts), timezone.utc).isoformat(timespec="seconds")


def data_window(events: pd.DataFrame, time_column: str = "timestamp", user_column: str = "user_id") -> dict:
    """first and last event time (ISO, UTC; undated events count but have no
    time), events, shoppers, and the categories, of the events a model learned from."""
    dated = events[time_column].dropna()
    window = {
        "first_event": iso(float(dated.min())) if len(dated) else None,
        "last_event": iso(float(dated.max())) if len(dated) else None,
        "events": int(len(events)),
        "shoppers": int(events[user_column].nunique()),
    }
    if "category" in events.columns:
        window["categories"] = sorted(events["category"].dropna().unique().tolist())
    return window


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--register", action="store_true",
                        help="also add the output to the model registry as a new version (not promoted: "
                             "`recsys promote`); the registry is --registry, else $RECSYS_MODEL_REGISTRY, "
                             "else var/models")
    parser.add_argument("--registry", type=Path, help=f"model registry folder (default ${ENV}, else var/models)")


def register(args: argparse.Namespace, kind: str, source: Path, window: dict, metrics: dict,
             **notes) -> ModelVersion | None:
    """Add `source` as the next `kind` version when --register was given."""
    if not getattr(args, "register", False):
        return None
    version = Registry(args.registry).add(kind, source, data_window=window, metrics=metrics, **notes)
    log.info("registered %s at %s", version.label, version.path)
    return version
