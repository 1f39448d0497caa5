"""RecordExposures' domain: what the gateway showed to whom in which A/B arm,
checked and stored beside the shopper's events (docs/operations.md, "A/B arms")."""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from recsys_core.errors import InvalidArgument, check_id_characters
from recsys_core.store.events import EventStore, StoredExposure
from services.profile.profiles import MAX_FUTURE_SECONDS, MAX_ID_CHARS, check_user_id

MAX_EXPOSURES_PER_REQUEST = 1000
# A Recommend reply holds at most 500 items (its k).
MAX_ITEMS_PER_EXPOSURE = 500
MAX_LABEL_CHARS = 64
_LABEL = re.compile(r"^[A-Za-z0-9_./:-]*$")


@dataclass(frozen=True)
class IncomingExposure:
    exposure_id: str
    user_id: str
    experiment: str
    arm: str
    model_version: str
    timestamp: int
    item_ids: Sequence[str]


def _label(value: str, name: str, required: bool) -> None:
    if required and not value:
        raise InvalidArgument(name, "must not be empty")
    if len(value) > MAX_LABEL_CHARS or not _LABEL.fullmatch(value):
        raise InvalidArgument(name, f"at most {MAX_LABEL_CHARS} of A-Z a-z 0-9 _ . / : -, got {value[:80]!r}")


def validate(exposures: Sequence[IncomingExposure], now: float) -> list[StoredExposure]:
    """The batch as the store keeps it; the first bad field refuses all of it."""
    if not exposures:
        raise InvalidArgument("exposures", "at least one exposure is required")
    if len(exposures) > MAX_EXPOSURES_PER_REQUEST:
        raise InvalidArgument("exposures", f"at most {MAX_EXPOSURES_PER_REQUEST} per request, got {len(exposures)}")
    stored = []
    for i, e in enumerate(exposures):
        where = f"exposures[{i}]"
        if not e.exposure_id or len(e.exposure_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"{where}.exposure_id", f"must be 1..{MAX_ID_CHARS} characters")
        check_id_characters(e.exposure_id, f"{where}.exposure_id")
        check_user_id(e.user_id, f"{where}.user_id")
        _label(e.experiment, f"{where}.experiment", required=True)
        _label(e.arm, f"{where}.arm", required=True)
        _label(e.model_version, f"{where}.model_version", required=False)
        if e.timestamp < 0 or e.timestamp > now + MAX_FUTURE_SECONDS:
            raise InvalidArgument(f"{where}.timestamp", f"{e.timestamp} is not a plausible unix time")
        if len(e.item_ids) > MAX_ITEMS_PER_EXPOSURE:
            raise InvalidArgument(f"{where}.item_ids", f"at most {MAX_ITEMS_PER_EXPOSURE}, got {len(e.item_ids)}")
        for j, item_id in enumerate(e.item_ids):
            if not item_id or len(item_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"{where}.item_ids[{j}]", f"must be 1..{MAX_ID_CHARS} characters")
            check_id_characters(item_id, f"{where}.item_ids[{j}]")
        stored.append(StoredExposure(e.exposure_id, e.user_id, e.experiment, e.arm, e.model_version,
                                     int(e.timestamp or now), tuple(e.item_ids)))
    return stored


def record(store: EventStore, exposures: Sequence[IncomingExposure]) -> tuple[int, int]:
    """(recorded, duplicates): the batch validated whole, then stored."""
    flags = store.record_exposures(validate(exposures, time.time()))
    recorded = sum(flags)
    return recorded, len(flags) - recorded
