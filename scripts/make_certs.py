"""A local CA, per-service certificates and a token key (what `recsys certs` does).

    python scripts/make_certs.py --out var/tls [--namespace recsys] [--identity gateway ...]

Each identity's folder holds tls.crt, tls.key and ca.crt, the layout of a
cert-manager Secret: point <SERVICE>_TLS_DIR at it, or load it into the
cluster (docs/operations.md, "Security"):

    kubectl -n recsys create secret generic profile-tls --from-file=var/tls/profile/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_cli.certs import certs_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(certs_main())
