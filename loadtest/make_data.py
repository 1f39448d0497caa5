"""Request data for the ghz load tests, drawn from a data set (default: the bundled data/).

    python loadtest/make_data.py [--data DIR] [--out loadtest/data] [--seed N]

Writes one JSON array of request messages per RPC; ghz sends them round-robin
(message i of a run is element i mod len), so every run mixes many requests:

  recommend.json      RecommendRequest: real shoppers, ~10% unknown ones (cold
                      start), ~20% filtered to one category and ~5% to two, ~10%
                      with items being looked at (context_item_ids); k mostly 10
  similar_items.json  SimilarItemsRequest: real items, as often as shoppers
                      touched them; ~20% restricted to another category
  ingest_events.json  IngestEventsRequest: real events (a shopper's next 1-5
                      interactions, as the profile service loads them: RATING
                      with the star rating where the set has one, else
                      PURCHASE), each with a unique idempotency key
  embed_texts.json    EmbedTextsRequest: 1-8 real item titles

The output is deterministic for a data set and seed. Idempotency keys are
unique within a file; replaying a file against the same profile store (a
second run, or more requests than the file holds) re-sends keys, which the
service counts as duplicates (recsys_profile_events_duplicates_total) without
storing them again.
"""
from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from recsys_core.data import shopping, paths  # noqa: E402

SEED = 20140101
COLD_START_SHARE = 0.10
ONE_CATEGORY_SHARE = 0.20
TWO_CATEGORIES_SHARE = 0.05
CONTEXT_SHARE = 0.10
SIMILAR_OTHER_CATEGORY_SHARE = 0.20
K_CHOICES = (10,) * 8 + (5, 20)
EMBED_BATCH_SIZES = (1, 1, 1, 2, 4, 8)
DEFAULT_SIZES = {"recommend": 2000, "similar_items": 1000, "ingest_events": 1000, "embed_texts": 500}
FILES = {name: f"{name}.json" for name in DEFAULT_SIZES}
ID_ALPHABET = string.ascii_uppercase + string.digits


def unknown_shopper(rng: random.Random, known: set[str]) -> str:
    """An id of the data set's shape (A + 13) that no shopper has."""
    while True:
        user_id = "A" + "".join(rng.choices(ID_ALPHABET, k=13))
        if user_id not in known:
            return user_id


def recommend_requests(interactions, items, count: int, rng: random.Random) -> list[dict]:
    shoppers = sorted(interactions["user_id"].unique())
    known = set(shoppers)
    categories = sorted(interactions["category"].dropna().unique())
    item_ids = items["item_id"].tolist()
    requests = []
    for _ in range(count):
        request: dict = {
            "user_id": unknown_shopper(rng, known) if rng.random() < COLD_START_SHARE else rng.choice(shoppers),
            "k": rng.choice(K_CHOICES),
        }
        draw = rng.random()
        if draw < TWO_CATEGORIES_SHARE:
            request["categories"] = rng.sample(categories, 2)
        elif draw < TWO_CATEGORIES_SHARE + ONE_CATEGORY_SHARE:
            request["categories"] = [rng.choice(categories)]
        if rng.random() < CONTEXT_SHARE:
            request["context_item_ids"] = rng.sample(item_ids, rng.choice((1, 1, 2, 3)))
        requests.append(request)
    return requests


def similar_items_requests(interactions, count: int, rng: random.Random) -> list[dict]:
    # Drawn from the events, so popular items are asked about as often as shoppers touch them.
    touched = interactions[["item_id", "category"]].itertuples(index=False)
    touched = list(touched)
    categories = sorted(interactions["category"].dropna().unique())
    requests = []
    for _ in range(count):
        item_id, category = rng.choice(touched)
        request: dict = {"item_id": item_id, "k": rng.choice(K_CHOICES)}
        if rng.random() < SIMILAR_OTHER_CATEGORY_SHARE:
            request["categories"] = [rng.choice([c for c in categories if c != category])]
        requests.append(request)
    return requests


def event_message(row, key: str) -> dict:
    event: dict = {"user_id": row.user_id, "item_id": row.item_id, "idempotency_key": key}
    if row.rating == row.rating:  # not NaN: the set carries a star rating (Office)
        event["type"] = "EVENT_TYPE_RATING"
        event["rating"] = float(row.rating)
    else:
        event["type"] = "EVENT_TYPE_PURCHASE"
    if row.timestamp == row.timestamp:  # Toys has none: 0 means "now" at ingestion
        event["timestamp"] = int(row.timestamp)
    return event


def ingest_events_requests(interactions, count: int, rng: random.Random, seed: int) -> list[dict]:
    """Batches of one shopper's consecutive real events, each event with its own key."""
    by_shopper = {user: frame for user, frame in shopping.chronological(interactions).groupby("user_id", sort=True)}
    shoppers = sorted(by_shopper)
    requests = []
    for number in range(count):
        events = by_shopper[rng.choice(shoppers)]
        size = min(rng.choice((1, 1, 2, 3, 5)), len(events))
        start = rng.randrange(0, len(events) - size + 1)
        rows = events.iloc[start:start + size].itertuples(index=False)
        requests.append({"events": [
            event_message(row, f"loadtest-{seed}-{number:06d}-{position}") for position, row in enumerate(rows)
        ]})
    return requests


def embed_texts_requests(items, count: int, rng: random.Random) -> list[dict]:
    titles = [title for title in items["display_title"].tolist() if title]
    return [{"texts": rng.sample(titles, rng.choice(EMBED_BATCH_SIZES))} for _ in range(count)]


def write_array(path: Path, messages: list[dict]) -> None:
    """One message per line: readable, diffable, and what ghz reads as a data array."""
    path.write_text("[\n" + ",\n".join(json.dumps(m, ensure_ascii=False, sort_keys=True) for m in messages) + "\n]\n")


def make(data_dir: Path, out: Path, seed: int = SEED, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    items = shopping.load_items(data_dir)
    interactions = shopping.load_interactions(data_dir)
    # Each file its own stream, so resizing one leaves the others unchanged.
    streams = {name: random.Random(f"{seed}:{name}") for name in FILES}
    messages = {
        "recommend": recommend_requests(interactions, items, sizes["recommend"], streams["recommend"]),
        "similar_items": similar_items_requests(interactions, sizes["similar_items"], streams["similar_items"]),
        "ingest_events": ingest_events_requests(interactions, sizes["ingest_events"], streams["ingest_events"], seed),
        "embed_texts": embed_texts_requests(items, sizes["embed_texts"], streams["embed_texts"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, batch in messages.items():
        written[name] = out / FILES[name]
        write_array(written[name], batch)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR), help="data set directory (default: data/)")
    parser.add_argument("--out", default=str(REPO_ROOT / "loadtest" / "data"), help="where the JSON files go")
    parser.add_argument("--seed", type=int, default=SEED)
    for name, size in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=size, metavar="N",
                            help=f"messages in {FILES[name]} (default {size})")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in DEFAULT_SIZES}
    if min(sizes.values()) < 1:
        parser.error("every file needs at least one message")
    for name, path in make(Path(args.data), Path(args.out), args.seed, sizes).items():
        print(f"{path}: {sizes[name]} {name} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
