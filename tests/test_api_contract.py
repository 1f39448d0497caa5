"""The public API is a contract (protos/baseline/README.md).

`buf lint` passes on protos/, and `buf breaking` finds no breaking change in
recsys.gateway.v1 (with the profile and common types it exposes) against the
committed baseline. The rest of the module makes sure that check can fail:
in a copy of protos/ it removes, retypes and renames gateway fields (caught),
adds one (passes), and changes internal protos (pass, unless the gateway
exposes the changed type).

buf comes from `make buf` (scripts/install_buf.sh, into .tools/bin) or PATH;
without it these tests skip, and fail under CI (where CI is set).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
BASELINE = PROTOS / "baseline" / "recsys.gateway.v1.yaml"
GATEWAY = "recsys/gateway/v1/gateway.proto"
# The public API: this package and every type it reaches (see the baseline's README).
PUBLIC_PACKAGE = "recsys.gateway.v1"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def buf() -> str:
    local = REPO / ".tools" / "bin" / "buf"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("buf")
    if found is None:
        message = "buf is not installed: run `make buf` (scripts/install_buf.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def breaking(buf: str, protos: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The contract check of protos/baseline/README.md on the protos in `protos`:
    an image of the public package and what it reaches, against the
    committed baseline, under protos' buf.yaml (FILE rules)."""
    image = tmp_path / "current.binpb"
    build = _run([buf, "build", str(protos), "--type", PUBLIC_PACKAGE, "-o", str(image)], cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    return _run(
        [buf, "breaking", str(image), "--config", str(protos / "buf.yaml"), "--against", str(BASELINE)],
        cwd=tmp_path,
    )


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    return copy


def edit_message(protos: Path, proto: str, message: str, old: str, new: str) -> None:
    """Replaces `old` with `new` inside `message`'s body in `proto`."""
    path = protos / proto
    text = path.read_text()
    start = text.index(f"message {message} {{")
    end = text.index("\n}", start) + 1
    body = text[start:end]
    assert old in body, f"{old!r} is not in {message} of {proto}"
    path.write_text(text[:start] + body.replace(old, new, 1) + text[end:])


def assert_breaks(result: subprocess.CompletedProcess[str], *names: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, f"buf breaking passed, expected a breaking change:\n{out}"
    for name in names:
        assert name in out, f"{name!r} not named in:\n{out}"


def assert_passes(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_passes(buf):
    result = _run([buf, "lint", "protos"], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_api_matches_baseline(buf, tmp_path):
    assert_passes(breaking(buf, PROTOS, tmp_path))


def test_baseline_holds_only_the_public_api():
    text = BASELINE.read_text()
    assert "name: GatewayService" in text
    # Exposed through GetProfile: part of the contract.
    assert "name: GetProfileResponse" in text
    # Internal: free to change.
    assert "recsys.ranking.v1" not in text
    assert "name: ProfileService" not in text


def test_removing_a_gateway_field_breaks(buf, protos_copy, tmp_path):
    edit_message(protos_copy, GATEWAY, "RecommendRequest", "  repeated string context_item_ids = 5;\n", "")
    assert_breaks(breaking(buf, protos_copy, tmp_path), "context_item_ids", "RecommendRequest")


def test_changing_a_gateway_field_type_breaks(buf, protos_copy, tmp_path):
    edit_message(protos_copy, GATEWAY, "RecommendRequest", "int32 k = 2;", "int64 k = 2;")
    assert_breaks(breaking(buf, protos_copy, tmp_path), '"k"', "RecommendRequest", "int64")


def test_renaming_a_gateway_field_breaks(buf, protos_copy, tmp_path):
    # Same number and type: wire compatible, but generated clients' names change.
    edit_message(protos_copy, GATEWAY, "RecommendRequest", "bool spread_interests = 6;", "bool spread = 6;")
    assert_breaks(breaking(buf, protos_copy, tmp_path), "spread_interests", "RecommendRequest")


def test_adding_a_gateway_field_passes(buf, protos_copy, tmp_path):
    edit_message(
        protos_copy, GATEWAY, "RecommendRequest",
        "int32 explore_slots = 7;", "int32 explore_slots = 7;\n  string locale = 8;",
    )
    assert_passes(breaking(buf, protos_copy, tmp_path))


def test_internal_proto_changes_freely(buf, protos_copy, tmp_path):
    # The gateway does not import ranking.proto.
    edit_message(
        protos_copy, "recsys/ranking/v1/ranking.proto", "UserFeatures",
        "  optional float churn_probability = 6;\n", "",
    )
    assert_passes(breaking(buf, protos_copy, tmp_path))


def test_unexposed_part_of_an_imported_proto_changes_freely(buf, protos_copy, tmp_path):
    # profile.proto is imported by the gateway, but IngestEvents and its
    # messages are not reachable from GatewayService.
    edit_message(protos_copy, "recsys/profile/v1/profile.proto", "IngestEventsResponse", "  int32 duplicates = 2;\n", "")
    assert_passes(breaking(buf, protos_copy, tmp_path))


def test_changing_a_profile_type_the_gateway_exposes_breaks(buf, protos_copy, tmp_path):
    # GetProfile hands recsys.profile.v1.GetProfileResponse to gateway callers.
    edit_message(
        protos_copy, "recsys/profile/v1/profile.proto", "GetProfileResponse",
        "  repeated string seen_item_ids = 7;\n", "",
    )
    assert_breaks(breaking(buf, protos_copy, tmp_path), "seen_item_ids", "GetProfileResponse")
