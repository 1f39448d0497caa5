#!/usr/bin/env bash
# Installs the load-test tools into .tools/bin (git-ignored) unless they are
# already there: ghz (the gRPC load generator) at a pinned version, and
# ghzhtml (loadtest/ghzhtml: ghz's HTML report from its JSON report). Needs Go
# and the Go module proxy, once.
#
#   scripts/install_ghz.sh          # then: .tools/bin/ghz, .tools/bin/ghzhtml
#
# ghz v0.121.0 (December 2025) is the newest release; its go.mod asks for Go
# 1.23, and it builds with Go 1.26.
set -euo pipefail
cd "$(dirname "$0")/.."

GHZ_VERSION=v0.121.0
BIN="$PWD/.tools/bin"
mkdir -p "$BIN"
# Keep the whole folder out of git without touching the repo's .gitignore.
[ -f .tools/.gitignore ] || echo '*' > .tools/.gitignore

# Non-interactive shells (CI) may not have Go's usual folder on PATH.
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { echo "install_ghz: Go is needed (https://go.dev/doc/install)" >&2; exit 1; }

# built_from BINARY MODULE VERSION: true when BINARY was built from MODULE@VERSION.
built_from() {
    [ -x "$BIN/$1" ] && go version -m "$BIN/$1" 2>/dev/null | grep -Eq "^[[:space:]]+$2[[:space:]]+$3([[:space:]]|$)"
}

if built_from ghz "mod[[:space:]]+github.com/bojand/ghz" "$GHZ_VERSION"; then
    echo "ghz $GHZ_VERSION already in $BIN"
else
    echo "installing ghz $GHZ_VERSION into $BIN"
    GOBIN="$BIN" GOFLAGS="${GOFLAGS:-} -buildvcs=false" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
    built_from ghz "mod[[:space:]]+github.com/bojand/ghz" "$GHZ_VERSION" \
        || { echo "install_ghz: ghz $GHZ_VERSION did not install" >&2; exit 1; }
fi

# ghzhtml: rebuilt when missing or older than its source (it links ghz's own printer).
if [ -x "$BIN/ghzhtml" ] && [ -z "$(find loadtest/ghzhtml -newer "$BIN/ghzhtml" -type f)" ] \
        && built_from ghzhtml "dep[[:space:]]+github.com/bojand/ghz" "$GHZ_VERSION"; then
    echo "ghzhtml already in $BIN"
else
    echo "building ghzhtml into $BIN"
    (cd loadtest/ghzhtml && GOFLAGS="${GOFLAGS:-} -buildvcs=false" go build -o "$BIN/ghzhtml" .)
fi
