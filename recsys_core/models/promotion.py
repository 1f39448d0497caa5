"""Promotion as an audited action: who promoted which version and why.

The registry's PROMOTED pointer holds only the current choice; this module
adds the trail beside it, one JSON line per promotion appended to
`<registry>/<kind>/promotions.jsonl` (appends of one short line are atomic
on a local filesystem, so two promoters never interleave), and the same
line on the `recsys.promotion` logger. Both `recsys promote` (a person) and
`recsys retrain` (the scheduled job) promote through here.
"""
from __future__ import annotations

import getpass
import json
import logging
import os

from recsys_core.models.registry import ModelVersion, Registry, now_iso

log = logging.getLogger("recsys.promotion")
HISTORY = "promotions.jsonl"


def current_user() -> str:
    """Who runs this process: RECSYS_ACTOR when set (a CronJob names itself),
    else the login name, else the uid (a container user without a passwd entry)."""
    actor = os.environ.get("RECSYS_ACTOR", "").strip()
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def promote(registry: Registry, kind: str, version: int, reason: str, by: str | None = None) -> ModelVersion:
    """Point PROMOTED at `version` and record the promotion. Raises
    errors.NotFound (before anything changes) for a version that is not there."""
    by = by or current_user()
    previous = registry.promotion_record(kind)
    chosen = registry.promote(kind, version, reason=f"{reason} (by {by})")
    audit(registry, kind, HISTORY, log, {
        "event": "promotion", "kind": kind, "version": chosen.version,
        "previous": None if previous is None else previous.get("version"), "at": now_iso(), "by": by,
        "reason": reason})
    return chosen


def audit(registry: Registry, kind: str, trail: str, logger: logging.Logger, record: dict) -> None:
    """One JSON line appended to `<registry>/<kind>/<trail>` and logged:
    how promotions (and prunes, recsys_core.models.pruning) are kept."""
    line = json.dumps(record, sort_keys=True)
    with open(registry.root / kind / trail, "a", encoding="utf-8") as kept:
        kept.write(line + "\n")
    logger.info(line)


def history(registry: Registry, kind: str) -> list[dict]:
    """Every recorded promotion of `kind`, oldest first."""
    try:
        lines = (registry.root / kind / HISTORY).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
