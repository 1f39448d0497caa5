"""Loading shopping data in the amazon-2014 schema.

Any directory holding `items.csv.gz` (item_id, category, title, brand,
description, category_path, generated_keywords) and `interactions.csv.gz`
(user_id, item_id, category, seq, timestamp, rating) can be loaded: the full
../shared/data/amazon-2014 set or the subset bundled in data/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recsys_core.data.paths import INTERACTIONS_FILE, ITEMS_FILE
ITEM_COLUMNS = ("item_id", "category", "title", "brand", "description", "category_path", "generated_keywords")
INTERACTION_COLUMNS = ("user_id", "item_id", "category", "seq", "timestamp", "rating")
# Long descriptions add little to a title for retrieval, and the encoder
# truncates anyway; cutting here keeps tokenisation cheap.
MAX_DESCRIPTION_CHARS = 300


class DataError(ValueError):
    pass


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing: a data directory needs {ITEMS_FILE} and {INTERACTIONS_FILE}")
    return path


def _check_columns(frame: pd.DataFrame, expected: tuple[str, ...], path: Path) -> None:
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}")


def load_items(data_dir: Path) -> pd.DataFrame:
    path = _require(Path(data_dir) / ITEMS_FILE)
    items = pd.read_csv(path, dtype=str, keep_default_na=False)
    _check_columns(items, ITEM_COLUMNS, path)
    return with_text(items.drop_duplicates("item_id", keep="first").reset_index(drop=True))


def with_text(items: pd.DataFrame) -> pd.DataFrame:
    """Items in the schema's columns, with the text the encoder reads and the title shoppers see."""
    items = items.copy()
    items["text"] = [item_text(row) for row in items.itertuples(index=False)]
    items["display_title"] = [display_title(row) for row in items.itertuples(index=False)]
    return items


def load_interactions(data_dir: Path) -> pd.DataFrame:
    path = _require(Path(data_dir) / INTERACTIONS_FILE)
    events = pd.read_csv(path, dtype={"user_id": str, "item_id": str, "category": str})
    _check_columns(events, INTERACTION_COLUMNS, path)
    events["seq"] = events["seq"].astype("int64")
    return events


def item_text(row) -> str:
    """The text the encoder reads for an item.

    Sports items have no real title in any public copy: their only text is
    model-generated keywords (IDGenRec), which stand in for the title.
    """
    parts = []
    title = row.title or row.generated_keywords
    if title:
        parts.append(title)
    if row.brand:
        parts.append(f"Brand: {row.brand}")
    if row.category_path:
        parts.append(f"Category: {row.category_path}")
    elif row.category:
        parts.append(f"Category: {row.category.replace('_', ' ')}")
    if row.description:
        parts.append(row.description[:MAX_DESCRIPTION_CHARS])
    return ". ".join(parts)


def display_title(row) -> str:
    return row.title or row.generated_keywords or row.item_id


@dataclass(frozen=True)
class Dataset:
    items: pd.DataFrame
    interactions: pd.DataFrame

    @classmethod
    def load(cls, data_dir: Path) -> "Dataset":
        return cls(load_items(data_dir), load_interactions(data_dir))


def chronological(events: pd.DataFrame) -> pd.DataFrame:
    """Events in the order a shopper made them.

    Within a category `seq` is the benchmark order and is authoritative; across
    categories only timestamps can interleave them. Toys has no timestamps, so
    its events sort before dated ones of the same shopper (treated as older).
    """
    ordered = events.assign(_ts=events["timestamp"].fillna(-1))
    ordered = ordered.sort_values(["user_id", "_ts", "category", "seq"], kind="stable")
    return ordered.drop(columns="_ts")
