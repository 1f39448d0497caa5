#!/usr/bin/env bash
# Installs the two tools tests/test_k8s.py runs, into .tools/bin (git-ignored),
# unless the pinned versions are already there. Needs Go and the Go module proxy.
#
#   scripts/install_k8s_tools.sh          # then: .tools/bin/kustomize, .tools/bin/kubeconform
#
# kustomize v5.8.2 is the newest release that builds with Go 1.26 (v5.8.3 needs 1.27).
set -euo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZE_VERSION=v5.8.2
KUBECONFORM_VERSION=v0.8.0
BIN="$PWD/.tools/bin"
mkdir -p "$BIN"
# Keep the whole folder out of git without touching the repo's .gitignore.
[ -f .tools/.gitignore ] || echo '*' > .tools/.gitignore

# Non-interactive shells (CI) may not have Go's usual folder on PATH.
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { echo "install_k8s_tools: Go is needed (https://go.dev/doc/install)" >&2; exit 1; }

# installed BINARY MODULE VERSION: true when BINARY was built from MODULE@VERSION.
installed() {
    [ -x "$BIN/$1" ] && go version -m "$BIN/$1" 2>/dev/null | grep -Eq "^[[:space:]]+mod[[:space:]]+$2[[:space:]]+$3([[:space:]]|$)"
}

install() {  # BINARY PACKAGE MODULE VERSION
    if installed "$1" "$3" "$4"; then
        echo "$1 $4 already in $BIN"
    else
        echo "installing $1 $4 into $BIN"
        GOBIN="$BIN" GOFLAGS="${GOFLAGS:-} -buildvcs=false" go install "$2@$4"
        installed "$1" "$3" "$4" || { echo "install_k8s_tools: $1 $4 did not install" >&2; exit 1; }
    fi
}

install kustomize sigs.k8s.io/kustomize/kustomize/v5 sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
install kubeconform github.com/yannh/kubeconform/cmd/kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION"
