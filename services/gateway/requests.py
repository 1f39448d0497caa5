"""Checking public requests and wording recommendations: gRPC-free."""
from __future__ import annotations

from collections.abc import Collection, Sequence

from recsys_core.errors import InvalidArgument, check_id_characters, quoted

MAX_K = 500
MAX_USER_ID_CHARS = 128
MAX_ITEM_ID_CHARS = 128
MAX_TITLE_IN_REASON = 60

# recsys.common.v1.EventType numbers -> the verb a shopper would use.
VERB_OF_EVENT = {1: "viewed", 2: "bought", 3: "rated", 4: "reviewed"}


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise InvalidArgument("k", f"must be between 1 and {MAX_K}, got {k}")
    return k


def check_user_id(user_id: str) -> str:
    if not user_id.strip():
        raise InvalidArgument("user_id", "must not be empty")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise InvalidArgument("user_id", f"is {len(user_id)} characters, the limit is {MAX_USER_ID_CHARS}")
    return check_id_characters(user_id, "user_id")


def check_item_id(item_id: str, field: str) -> str:
    if not item_id.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidArgument(field, f"is {len(item_id)} characters, the limit is {MAX_ITEM_ID_CHARS}")
    return check_id_characters(item_id, field)


def check_categories(categories: Sequence[str], known: Collection[str]) -> list[str]:
    """Unknown names are refused by name; `known` empty means the catalogue's
    list is not available yet and the embedding service will check instead."""
    for name in categories:
        if known and name not in known:
            raise InvalidArgument("categories", f"unknown category {quoted(name)}; known: {', '.join(sorted(known))}")
    return list(dict.fromkeys(categories))


def check_context(item_ids: Sequence[str], limit: int) -> list[str]:
    if len(item_ids) > limit:
        raise InvalidArgument("context_item_ids", f"at most {limit} items, got {len(item_ids)}")
    for position, item_id in enumerate(item_ids):
        check_item_id(item_id, f"context_item_ids[{position}]")
    return list(dict.fromkeys(item_ids))


def check_exploration(spread_interests: bool, explore_slots: int, k: int) -> int:
    if not 0 <= explore_slots <= k:
        raise InvalidArgument("explore_slots", f"must be between 0 and k ({k}), got {explore_slots}")
    if explore_slots and not spread_interests:
        raise InvalidArgument("explore_slots", "needs spread_interests")
    return explore_slots


def short_title(title: str) -> str:
    return title if len(title) <= MAX_TITLE_IN_REASON else title[: MAX_TITLE_IN_REASON - 1].rstrip() + "…"


def because_reason(event_type: int, title: str) -> str:
    return f"because you {VERB_OF_EVENT.get(event_type, 'liked')} {short_title(title)}"


def similar_reason(title: str) -> str:
    return f"similar to {short_title(title)}"


def interest_reason(label: str) -> str:
    return f"for your interest in {short_title(label)}"


def explore_reason(category: str) -> str:
    return f"something new for you: {short_title(category.replace(', ', ' > '))}"


def co_purchase_reason(shoppers: int) -> str:
    return f"bought by {shoppers} shopper{'s' if shoppers != 1 else ''} with purchases like yours"


def popular_reason(category: str) -> str:
    return f"popular in {category.replace('_', ' ')}"
