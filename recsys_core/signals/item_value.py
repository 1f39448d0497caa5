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

from collections.abc import Sequence

import numpy as np

PRIOR_PURCHASES = 5.0


def return_shares(sequences: Sequence[np.ndarray], num_items: int, occasions: Sequence[np.ndarray] | None = None,
                  prior_purchases: float = PRIOR_PURCHASES) -> np.ndarray:
    """Per item (float32, 0..1), the shrunk share of its purchases that the
    shopper followed with a purchase on a later occasion. `sequences`: each
    shopper's item indices, oldest first; `occasions`: parallel, the basket
    (non-decreasing) of each purchase, None when every purchase is its own."""
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
    total = bought.sum()
    overall = returned.sum() / total if total else 0.0
    return ((returned + prior_purchases * overall) / (bought + prior_purchases)).astype(np.float32)
