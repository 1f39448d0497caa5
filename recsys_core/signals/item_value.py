"""An item's long-term value to the shop, as the value-aware ranking
objective reads it (recsys_core/ranking/scoring.py, the value term;
docs/results.md, "Value-aware ranking").

The value of an item is the share of its purchases after which the same
shopper came back and bought again on a later occasion (a later invoice, or
a later event where events have no basket): what keeps shoppers engaged. A
shop earns a returning shopper's every future basket, not one sale's
price, and unlike a price it is known for every catalogue (the Amazon data
have none).

Few purchases say little: the share is shrunk towards the share over all
items, as if every item had PRIOR_PURCHASES more purchases at that share, so
that an item bought once and followed once is not worth 1.0.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRIOR_PURCHASES = 5.0


def purchase_counts(sequences: Sequence[np.ndarray], num_items: int,
                    occasions: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per item, (purchases, purchases the shopper followed with one on a
    later occasion). `sequences`: each shopper's item indices, oldest first;
    `occasions`: parallel, the basket (non-decreasing) of each purchase, None
    when every purchase is its own."""
    bought = np.zeros(num_items, dtype=np.float64)
    returned = np.zeros(num_items, dtype=np.float64)
    for position, items in enumerate(sequences):
        items = np.asarray(items, dtype=np.int64)
        if not len(items):
            continue
        basket = np.arange(len(items)) if occasions is None else np.asarray(occasions[position])
        if basket.shape != items.shape:
            raise ValueError(f"sequence {position}: {len(items)} items but {basket.shape[0]} occasions")
        np.add.at(bought, items, 1.0)
        np.add.at(returned, items, (basket < basket[-1]).astype(np.float64))
    return bought, returned


def shrunk(bought: np.ndarray, returned: np.ndarray, prior_purchases: float = PRIOR_PURCHASES) -> tuple[np.ndarray, float]:
    """(per item share, shrunk towards the overall share; the overall share)."""
    total = bought.sum()
    overall = float(returned.sum() / total) if total else 0.0
    return ((returned + prior_purchases * overall) / (bought + prior_purchases)).astype(np.float32), overall


def return_shares(sequences: Sequence[np.ndarray], num_items: int, occasions: Sequence[np.ndarray] | None = None,
                  prior_purchases: float = PRIOR_PURCHASES) -> np.ndarray:
    """Per item (float32, 0..1), the shrunk share of its purchases that the
    shopper followed with a purchase on a later occasion (purchase_counts)."""
    return shrunk(*purchase_counts(sequences, num_items, occasions), prior_purchases)[0]

class ItemValuesError(ValueError):
    pass


@dataclass(frozen=True)
class ItemValues:
    """The ranking service's table of item values (RANKING_ITEM_VALUES),
    written by `recsys item-values` from the shop's events: slow-moving
    catalogue statistics, like a model artifact. An item it lacks gets
    `default`, the share over all items, so a new item is neither favoured
    nor pushed down."""
    values: dict[str, float]
    default: float

    def of(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.asarray([self.values.get(item_id, self.default) for item_id in item_ids], dtype=np.float32)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"kind": KIND, "definition": DEFINITION, "default": self.default, "values": self.values}
        path.write_text(json.dumps(payload, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "ItemValues":
        """The table, every value checked (a share, 0..1): a bad file stops the
        service's start rather than skewing each order."""
        try:
            payload = json.loads(Path(path).read_text())
        except OSError as error:
            raise ItemValuesError(f"{path}: cannot read ({error.strerror or error})") from None
        except ValueError as error:
            raise ItemValuesError(f"{path}: not JSON ({error})") from None
        if not isinstance(payload, dict) or payload.get("kind") != KIND or not isinstance(payload.get("values"), dict):
            raise ItemValuesError(f"{path}: not an item-value table (`recsys item-values` writes one)")
        table = {**payload["values"], "(default)": payload.get("default")}
        for item_id, value in table.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ItemValuesError(f"{path}: {item_id}: value {value!r} is not between 0 and 1")
        return cls({str(k): float(v) for k, v in payload["values"].items()}, float(payload["default"]))


KIND = "item-values"
DEFINITION = ("shrunk share of the item's purchases followed by another purchase of the same shopper on a later "
              f"occasion (prior: {PRIOR_PURCHASES:g} purchases at the share over all items)")


def item_values(sequences: Sequence[np.ndarray], item_ids: Sequence[str],
                occasions: Sequence[np.ndarray] | None = None) -> ItemValues:
    """The table of every item bought at least once, from whole sequences."""
    bought, returned = purchase_counts(sequences, len(item_ids), occasions)
    shares, overall = shrunk(bought, returned)
    return ItemValues({item_ids[i]: round(float(shares[i]), 6) for i in np.flatnonzero(bought)}, round(overall, 6))
