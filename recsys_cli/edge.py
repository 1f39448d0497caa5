"""recsys-edge (edge/main.go): the gateway's public front that refuses an
oversized request from its length prefix, before its body arrives
(docs/operations.md, "The edge"). Built with Go's standard library only, so
offline; `make setup` builds it, `python -m recsys_cli.edge` does the same.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from recsys_core.data import paths

SOURCE_DIR = paths.REPO_ROOT / "edge"
BINARY = paths.REPO_ROOT / ".tools" / "bin" / "recsys-edge"


class EdgeUnavailable(RuntimeError):
    pass


def _go() -> str | None:
    # Non-interactive shells (CI) may not have Go's usual folder on PATH.
    return shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)


def _stale(binary: Path) -> bool:
    if not binary.exists():
        return True
    built = binary.stat().st_mtime
    return any(source.stat().st_mtime > built for source in SOURCE_DIR.iterdir() if source.is_file())


def edge_binary(build: bool = True) -> Path:
    """The built binary, (re)built from edge/ when missing or older than its source."""
    if not _stale(BINARY):
        return BINARY
    if not build:
        raise EdgeUnavailable(f"{BINARY} is not built (make setup, or python -m recsys_cli.edge)")
    go = _go()
    if go is None:
        raise EdgeUnavailable("Go 1.24 or newer is needed to build recsys-edge (https://go.dev/doc/install)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS=(os.environ.get("GOFLAGS", "") + " -buildvcs=false").strip(),
               CGO_ENABLED="0", GOTOOLCHAIN="local")
    result = subprocess.run([go, "build", "-trimpath", "-o", str(BINARY), "."], cwd=SOURCE_DIR, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise EdgeUnavailable(f"building recsys-edge failed:\n{result.stderr.strip()}")
    return BINARY


def main() -> int:
    try:
        print(f"recsys-edge: {edge_binary()}")
    except EdgeUnavailable as error:
        print(f"recsys-edge: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
