#!/usr/bin/env bash
# Installs buf (the Protobuf linter and breaking-change checker) into
# .tools/bin (git-ignored) at a pinned version, unless a binary built from
# that version is already there. Needs Go and the Go module proxy, once.
#
#   scripts/install_buf.sh          # then: .tools/bin/buf
#
# Used by `make buf` (part of `make setup`) and by tests/test_api_contract.py,
# which runs `buf lint protos` and `buf breaking` of recsys.gateway.v1 against
# protos/baseline/ (see protos/baseline/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=v1.75.0
BUF_MODULE=github.com/bufbuild/buf
BIN="$PWD/.tools/bin"
mkdir -p "$BIN"
# Keep the whole folder out of git without touching the repo's .gitignore.
[ -f .tools/.gitignore ] || echo '*' > .tools/.gitignore

# Non-interactive shells (CI) may not have Go's usual folder on PATH.
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { echo "install_buf: Go is needed to install buf (https://go.dev/doc/install)" >&2; exit 1; }

# built_from: true when .tools/bin/buf was built from $BUF_MODULE@$BUF_VERSION.
built_from() {
    [ -x "$BIN/buf" ] && go version -m "$BIN/buf" 2>/dev/null \
        | grep -Eq "^[[:space:]]+mod[[:space:]]+$BUF_MODULE[[:space:]]+$BUF_VERSION([[:space:]]|$)"
}

if built_from; then
    echo "buf $BUF_VERSION already in $BIN"
else
    echo "installing buf $BUF_VERSION into $BIN"
    GOBIN="$BIN" GOFLAGS="${GOFLAGS:-} -buildvcs=false" go install "$BUF_MODULE/cmd/buf@$BUF_VERSION"
    built_from || { echo "install_buf: buf $BUF_VERSION did not install" >&2; exit 1; }
fi
