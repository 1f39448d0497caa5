"""A/B arms and the stable assignment of shoppers to them.

GATEWAY_AB_ARMS names the arms, each with the ranking model it is served by
and its weight: `control=ranker/3:50,treatment=ranker/4:50` (registry
versions of the learned ranker), or `hand` for the hand-set weights,
`baseline=hand:10,new=ranker/4:90`. GATEWAY_AB_SALT names the experiment.

A shopper's arm is a function of (salt, user id) alone: the first 8 bytes of
SHA-256(salt + "\\n" + user id) as an unsigned integer, modulo the sum of the
weights, picks the bucket. So every gateway replica, before and after any
restart, puts a shopper in the same arm, with nothing stored; a new salt (a
new experiment) reshuffles everyone independently of the last one. The
modulo bias of a 64-bit value over weights summing to at most 10^6 is below
10^-13.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

HAND = "hand"
MAX_WEIGHT_TOTAL = 1_000_000
MAX_ARMS = 16
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RANKER = re.compile(r"^ranker/([1-9][0-9]{0,8})$")


class ArmsError(ValueError):
    """A GATEWAY_AB_ARMS value that cannot be served: says what is wrong."""


@dataclass(frozen=True)
class Arm:
    name: str
    # What ranks its lists: "hand" or "ranker/<n>" (RankRequest.model_version).
    model_version: str
    weight: int


def check_model_version(value: str) -> str:
    """"hand" or "ranker/<n>", as RankRequest.model_version takes them."""
    if value == HAND or _RANKER.fullmatch(value):
        return value
    raise ArmsError(f"model {value!r}: expected 'hand' or 'ranker/<version>' (a version of the registry's rankers)")


def ranker_version(model_version: str) -> int | None:
    """The registry version a "ranker/<n>" names; None for "hand"."""
    found = _RANKER.fullmatch(model_version)
    return int(found.group(1)) if found else None


def parse_arms(spec: str) -> tuple[Arm, ...]:
    """`name=model:weight,...`; empty: no experiment. Weights are whole
    numbers >= 0 (0 parks an arm: nobody new is assigned to it)."""
    spec = spec.strip()
    if not spec:
        return ()
    arms = []
    for part in spec.split(","):
        part = part.strip()
        name, equals, rest = part.partition("=")
        model, colon, weight = rest.rpartition(":")
        if not equals or not colon:
            raise ArmsError(f"{part!r}: expected name=model:weight, e.g. control=ranker/3:50")
        name, model = name.strip(), model.strip()
        if not _NAME.fullmatch(name):
            raise ArmsError(f"{part!r}: an arm's name is 1..64 of A-Z a-z 0-9 _ . -")
        check_model_version(model)
        try:
            weight_value = int(weight)
        except ValueError:
            raise ArmsError(f"{part!r}: the weight {weight!r} is not a whole number") from None
        if weight_value < 0:
            raise ArmsError(f"{part!r}: the weight must not be negative")
        arms.append(Arm(name, model, weight_value))
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ArmsError(f"arm names repeat: {names}")
    if len(arms) < 2:
        raise ArmsError("an experiment needs at least two arms")
    if len(arms) > MAX_ARMS:
        raise ArmsError(f"at most {MAX_ARMS} arms, got {len(arms)}")
    total = sum(arm.weight for arm in arms)
    if not 0 < total <= MAX_WEIGHT_TOTAL:
        raise ArmsError(f"the weights must sum to 1..{MAX_WEIGHT_TOTAL}, got {total}")
    return tuple(arms)


def bucket(salt: str, user_id: str, buckets: int) -> int:
    digest = hashlib.sha256(f"{salt}\n{user_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


@dataclass(frozen=True)
class Experiment:
    salt: str
    arms: tuple[Arm, ...]

    def assign(self, user_id: str) -> Arm:
        """The shopper's arm: the same for every replica and every restart."""
        point = bucket(self.salt, user_id, sum(arm.weight for arm in self.arms))
        for arm in self.arms:
            if point < arm.weight:
                return arm
            point -= arm.weight
        raise AssertionError("unreachable: the weights sum past every bucket")

    def describe(self) -> str:
        return f"experiment {self.salt!r}: " + ", ".join(
            f"{arm.name} ({arm.model_version}, weight {arm.weight})" for arm in self.arms)
