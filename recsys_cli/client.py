"""Talking to a running gateway from the command line: the calls, and the
replies printed or plotted for a person."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def example_shopper(data_dir: Path) -> str:
    """A real shopper of the data set who shops in several categories: the
    most telling example of cross-category recommendations."""
    from recsys_core.data.shopping import load_interactions

    events = load_interactions(data_dir)
    spread = events.groupby("user_id").agg(categories=("category", "nunique"), events=("item_id", "size"))
    return spread.sort_values(["categories", "events"], ascending=False).index[0]


def print_recommendations(reply, as_json: bool) -> None:
    from recsys.gateway.v1 import gateway_pb2

    path = gateway_pb2.RecommendationPath.Name(reply.path).removeprefix("RECOMMENDATION_PATH_").lower()
    if as_json:
        print(json.dumps({
            "path": path,
            # A/B arms (docs/operations.md, "A/B arms"): empty without an experiment.
            "arm": reply.arm,
            "model_version": reply.model_version,
            "items": [
                {"item_id": i.item_id, "category": i.category, "title": i.title, "score": round(i.score, 4), "reason": i.reason}
                for i in reply.items
            ],
        }, indent=2))
        return
    print(f"path: {path}" + (f"  arm: {reply.arm}" if reply.arm else "")
          + (f"  ranked by: {reply.model_version}" if reply.model_version else ""))
    print(f"{'#':>3}  {'item':<12} {'category':<20} {'score':>6}  title / reason")
    for rank, item in enumerate(reply.items, 1):
        print(f"{rank:>3}  {item.item_id:<12} {item.category[:20]:<20} {item.score:>6.3f}  {item.title[:70]}")
        print(f"{'':>46}{item.reason}")


def gateway_channel(address: str, tls_dir: Path | None = None):
    """A channel to the gateway with this user's credentials, from the environment:

    RECSYS_TOKEN (or RECSYS_TOKEN_FILE; default var/tls/admin.token, which
    `recsys serve` writes) is sent as `authorization: Bearer`; TLS is checked
    against RECSYS_GATEWAY_CA (default var/tls/ca.crt when it exists, else the
    system's roots); RECSYS_GATEWAY_PLAINTEXT=1 for a gateway without TLS.
    `tls_dir`: another stack's `recsys certs` directory instead of var/tls.
    """
    import os

    from recsys_core.data import paths
    from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS
    from recsys_core.rpc.transport import client_channel

    local = Path(tls_dir) if tls_dir is not None else paths.REPO_ROOT / "var" / "tls"
    token = os.environ.get("RECSYS_TOKEN", "").strip()
    token_file = Path(os.environ.get("RECSYS_TOKEN_FILE") or local / "admin.token")
    if not token and token_file.is_file():
        token = token_file.read_text().strip()
    if os.environ.get("RECSYS_GATEWAY_PLAINTEXT", "").lower() in ("1", "true", "yes"):
        return client_channel(address, plaintext=True, token=token or None, options=CHANNEL_OPTIONS)
    ca = os.environ.get("RECSYS_GATEWAY_CA") or (str(local / "ca.crt") if (local / "ca.crt").is_file() else None)
    return client_channel(address, ca=ca, token=token or None, options=CHANNEL_OPTIONS)


def call_recommend(address: str, user_id: str, k: int, categories: list[str], timeout: float | None,
                   spread_interests: bool = False, explore: int = 0, channel=None):
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    with channel if channel is not None else gateway_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=user_id, k=k, categories=categories,
                                         spread_interests=spread_interests, explore_slots=explore),
            timeout=timeout or 10.0,
        )


def recommend(address: str, user_id: str, k: int, categories: list[str], timeout: float | None,
              spread_interests: bool, explore: int, as_json: bool) -> int:
    """`recsys recommend`: the gateway's list for a shopper, printed."""
    import grpc

    try:
        reply = call_recommend(address, user_id, k, categories, timeout, spread_interests, explore)
    except grpc.RpcError as error:
        print(f"recsys recommend: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print_recommendations(reply, as_json)
    return 0


def call_profile(address: str, user_id: str, history: int, timeout: float | None, channel=None):
    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys.profile.v1 import profile_pb2

    with channel if channel is not None else gateway_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.GetProfile(profile_pb2.GetProfileRequest(user_id=user_id, history_limit=history),
                               timeout=timeout or 10.0)


def profile_dict(reply) -> dict:
    """The profile as JSON-ready data, without raw vectors (unreadable, and
    GetProfile returns them to programs that need them)."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for name in ("long_term_interest", "short_term_interest"):
        data.pop(name, None)
    for interest in data.get("interests", []):
        interest.pop("centroid", None)
    return data


def when(timestamp: int) -> str:
    import datetime

    if not timestamp:
        return "no date"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def shares(entries, limit: int = 4) -> str:
    return " · ".join(f"{e.category.replace(', ', ' > ')} {e.share:.0%}" for e in list(entries)[:limit]) or "-"


def print_profile(reply) -> None:
    if not reply.known:
        print(f"shopper {reply.user_id}: no events (recommendations take the cold-start path)")
        return
    categories = ", ".join(f"{c.category} {c.events}" for c in reply.categories)
    print(f"shopper {reply.user_id}: {reply.event_count} events ({categories})")
    drift = reply.drift
    state = "DRIFTING" if drift.drifting else "steady"
    print(f"\ninterest drift: {drift.score:.2f} (flag at {drift.threshold:.2f}): {state}; "
          f"embedding distance {drift.embedding_distance:.2f}, category shift {drift.category_shift:.2f}")
    print(f"  long-term taste: {shares(drift.long_term_categories)}")
    print(f"  recent events:   {shares(drift.short_term_categories)}")
    print("\ninterests:")
    for rank, interest in enumerate(reply.interests, 1):
        print(f"  {rank}. {interest.label[:60]:<60} {interest.weight:>4.0%}  {interest.events:>3} events, "
              f"last {interest.last_position} events ago ({when(interest.last_timestamp)})")
    if reply.HasField("value"):
        value = reply.value
        spend = ("no amounts in the events" if value.expected_spend_3m < 0 else
                 f"next 3 months {value.expected_spend_3m:,.2f}, 12 months {value.expected_spend_12m:,.2f}")
        print(f"\nvalue (as of {when(value.as_of)}): churn {value.churn_probability:.0%} "
              f"within {value.churn_horizon_days} days; expected spend {spend}")
    if reply.HasField("preferences") and reply.preferences.reviews:
        p = reply.preferences
        aspects = ", ".join(f"{a.aspect} (+{a.praised} -{a.criticised})" for a in p.aspects) or "-"
        print(f"\nreviews: {p.reviews} ({p.positive} positive, {p.negative} negative); cares about: {aspects}")
    print("\nrecent history:")
    for event in reply.recent_history[:10]:
        rating = f" {event.rating:.0f}★" if event.rating else ""
        print(f"  {when(event.timestamp)}  {event.item_id:<14} {event.category}{rating}")


def plot_timeline(reply, out: Path) -> None:
    """The shopper's events over time, one row per interest cluster: when each
    interest was active, and which one the recent events belong to."""
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_of = {}
    for row, interest in enumerate(reply.interests):
        for item_id in interest.item_ids:
            row_of.setdefault(item_id, row)
    events = [e for e in reversed(reply.recent_history) if e.item_id in row_of]
    dated = all(e.timestamp for e in events)
    xs = [datetime.datetime.fromtimestamp(e.timestamp, datetime.timezone.utc) if dated else position
          for position, e in enumerate(events)]
    figure, axis = plt.subplots(figsize=(11, 1.2 + 0.6 * max(len(reply.interests), 1)))
    for row, interest in enumerate(reply.interests):
        mine = [x for x, e in zip(xs, events) if row_of[e.item_id] == row]
        axis.scatter(mine, [row] * len(mine), s=30 + 300 * interest.weight, alpha=0.6)
    axis.set_yticks(range(len(reply.interests)))
    axis.set_yticklabels([f"{i.label[:45]} ({i.weight:.0%})" for i in reply.interests])
    axis.invert_yaxis()
    axis.set_xlabel("date" if dated else "event (oldest first)")
    state = "drifting" if reply.drift.drifting else "steady"
    axis.set_title(f"shopper {reply.user_id}: interests over time; drift {reply.drift.score:.2f} ({state})")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def profile(address: str, user_id: str, history: int, timeout: float | None, as_json: bool,
            timeline: Path | None, timeline_events: int) -> int:
    """`recsys profile`: what the platform understands of a shopper, printed
    (and, with `timeline`, plotted)."""
    import grpc

    wanted = max(history, timeline_events) if timeline else history
    try:
        reply = call_profile(address, user_id, wanted, timeout)
    except grpc.RpcError as error:
        print(f"recsys profile: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if timeline:
        plot_timeline(reply, Path(timeline))
        del reply.recent_history[history:]
    if as_json:
        print(json.dumps(profile_dict(reply), indent=2))
    else:
        print_profile(reply)
    if timeline:
        print(f"timeline written to {timeline}", file=sys.stderr)
    return 0


def delete_user(address: str, user_id: str, timeout: float | None, as_json: bool) -> int:
    """`recsys delete-user`: forget a shopper through the gateway, with
    RECSYS_TOKEN (the shopper's own token, or an admin's)."""
    import grpc

    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys.profile.v1 import profile_pb2

    try:
        with gateway_channel(address) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).DeleteUser(
                profile_pb2.DeleteUserRequest(user_id=user_id), timeout=timeout or 30.0)
    except grpc.RpcError as error:
        print(f"recsys delete-user: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"user_id": reply.user_id, "events_removed": reply.events_removed,
                          "items_affected": reply.items_affected}))
    elif reply.events_removed:
        print(f"forgot {reply.user_id}: {reply.events_removed} events on {reply.items_affected} items removed")
    else:
        print(f"nothing to forget for {reply.user_id}: no events stored (never seen, or forgotten before)")
    return 0
