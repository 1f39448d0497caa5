"""A real redis-server on loopback, for the tests and for trying the Redis store.

Started with the durable settings the Redis event store requires by default
(append-only file, fsync before every reply, no RDB snapshots), on a port and
in a directory of the caller's choosing, never as a system service. The binary
is `redis-server` on PATH (`make setup` installs Debian's package when it is
missing) or the one RECSYS_REDIS_SERVER names.

    with LocalRedis(tmp_dir) as server:
        store = RedisEventStore(server.url)

LocalRedisCluster starts several such servers as the masters of one Redis
Cluster (slots split evenly, no replicas), for the cluster tests.

CLI: `python -m recsys_core.store.local_redis --dir var/redis --port 6379` serves until Ctrl-C
(`--cluster-masters 3`: a Redis Cluster of three masters on free ports).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
DURABLE_ARGS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
# What the profile service's ACL user may do: its own keys only; reads, writes,
# its Lua write script, transactions, and the two checks it makes at start
# (INFO, CONFIG GET for the persistence settings). Nothing dangerous else.
# In a Redis Cluster it also reads the slot map (CLUSTER SLOTS/SHARDS) and
# follows ASK redirections while slots move.
PROFILE_ACL = ("-@all +@read +@write +@scripting +@transaction +@connection -@dangerous "
               "+info +config|get +cluster|slots +cluster|shards +cluster|myid +asking")
PROFILE_KEYS = ("recsys:profile:*",)
# The embedding service's user: the shared catalogue (recsys_core/store/catalogue_redis.py)
# and nothing else; the same commands as the profile's.
CATALOGUE_ACL = PROFILE_ACL
CATALOGUE_KEYS = ("recsys:catalogue:*",)


def acl_lines(passwords: dict[str, str], profile_keys=PROFILE_KEYS, catalogue_keys=CATALOGUE_KEYS) -> list[str]:
    """ACL users: `default` off (no unauthenticated access), `profile` and
    `embedding` (the services; each its own key prefix only), `admin`
    (operators: everything). Passwords as SHA-256 hashes, as an ACL file holds them."""
    import hashlib

    def digest(user: str) -> str:
        return "#" + hashlib.sha256(passwords[user].encode()).hexdigest()

    keys = " ".join(f"~{pattern}" for pattern in profile_keys)
    catalogue = " ".join(f"~{pattern}" for pattern in catalogue_keys)
    return [
        # `off`: no connection can be the default user. Its permissions stay
        # whole because Redis 7.0 replays MULTI/EXEC from the append-only file
        # under them at start (restricted, the replay fails with NOPERM and
        # acknowledged events would be lost).
        "user default off resetpass ~* &* +@all",
        f"user profile on {digest('profile')} resetkeys {keys} resetchannels {PROFILE_ACL}",
        f"user embedding on {digest('embedding')} resetkeys {catalogue} resetchannels {CATALOGUE_ACL}",
        f"user admin on {digest('admin')} ~* &* +@all",
        # Kubernetes' readiness probe: PING and nothing else, no secret needed.
        "user probe on nopass resetkeys resetchannels -@all +ping",
    ]


def make_passwords() -> dict[str, str]:
    import secrets

    return {"profile": secrets.token_urlsafe(24), "embedding": secrets.token_urlsafe(24),
            "admin": secrets.token_urlsafe(24)}


def redis_server_binary() -> str | None:
    return os.environ.get("RECSYS_REDIS_SERVER") or shutil.which("redis-server")


def _die_with_parent() -> list[str]:
    # Should the starting process be killed outright, the kernel stops the
    # server too instead of leaving it behind (PR_SET_PDEATHSIG; note it fires
    # when the *thread* that started the server exits). Through util-linux's
    # setpriv rather than a preexec_fn: a fork of a process with gRPC threads
    # can abort in the child before it reaches exec.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class LocalRedis:
    def __init__(self, directory: Path | str, port: int | None = None, extra_args: tuple[str, ...] = (),
                 profile_keys: tuple[str, ...] = PROFILE_KEYS, passwords: dict[str, str] | None = None,
                 catalogue_keys: tuple[str, ...] = CATALOGUE_KEYS):
        """With ACL users (acl_lines): `url` is the profile user's, `catalogue_url`
        the embedding service's, `admin_url` the operators'."""
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed: `make setup` installs it (apt-get install redis-server)"
            )
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.passwords = passwords or make_passwords()
        self.acl_file = self.directory / "users.acl"
        self.acl_file.write_text("\n".join(acl_lines(self.passwords, profile_keys, catalogue_keys)) + "\n")
        os.chmod(self.acl_file, 0o600)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The profile service's: its ACL user and password."""
        return f"redis://profile:{self.passwords['profile']}@{HOST}:{self.port}/0"

    @property
    def catalogue_url(self) -> str:
        """The embedding service's: its ACL user (the catalogue's keys only)."""
        return f"redis://embedding:{self.passwords['embedding']}@{HOST}:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://admin:{self.passwords['admin']}@{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 20.0) -> "LocalRedis":
        """Starts the server; again after kill() or stop(), on the same port and files."""
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        command = [
            *_die_with_parent(), self.binary, "--bind", HOST, "--port", str(self.port), "--dir", str(self.directory),
            *DURABLE_ARGS, "--daemonize", "no", "--protected-mode", "yes", "--aclfile", str(self.acl_file),
            "--logfile", str(self.log_path), *self.extra_args,
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        give_up = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {stderr}{log}")
            if self._ping():
                return self
            if time.monotonic() > give_up:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout:.0f}s")
            time.sleep(0.05)

    def _ping(self) -> bool:
        # Answers PONG only once the AOF is loaded (LOADING before).
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as connection:
                connection.sendall(f"AUTH admin {self.passwords['admin']}\r\nPING\r\n".encode())
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = connection.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply.startswith(b"+OK\r\n+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync - a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


CLUSTER_SLOTS = 16384


class LocalRedisCluster:
    """`masters` LocalRedis servers with cluster-enabled yes, joined into one
    cluster: slots assigned with CLUSTER ADDSLOTSRANGE, nodes introduced with
    CLUSTER MEET (no redis-cli needed). Same ACL users and durable settings on
    every node; `url` is the profile user's URL of the first node, which
    RedisCluster uses as its seed, and `nodes` all of them."""

    def __init__(self, directory: Path | str, masters: int = 3, profile_keys: tuple[str, ...] = PROFILE_KEYS,
                 passwords: dict[str, str] | None = None):
        self.passwords = passwords or make_passwords()
        self.bus_ports = [free_port() for _ in range(masters)]
        self.servers = [
            LocalRedis(Path(directory) / f"node{n}", profile_keys=profile_keys, passwords=self.passwords,
                       # The bus port on a free port of its own: the default,
                       # port + 10000, may be taken or past 65535.
                       extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                   "--cluster-node-timeout", "5000", "--cluster-port", str(self.bus_ports[n])))
            for n in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def catalogue_url(self) -> str:
        """The embedding service's URL of the first node (EMBEDDING_CATALOGUE_REDIS_MODE=cluster)."""
        return self.servers[0].catalogue_url

    @property
    def admin_url(self) -> str:
        return self.servers[0].admin_url

    @property
    def nodes(self) -> list[str]:
        return [f"{HOST}:{server.port}" for server in self.servers]

    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        import redis

        for server in self.servers:
            server.start()
        admins = [redis.Redis.from_url(server.admin_url, decode_responses=True) for server in self.servers]
        try:
            if admins[0].cluster("info").get("cluster_state") != "ok":
                share = CLUSTER_SLOTS // len(self.servers)
                for n, admin in enumerate(admins):
                    last = CLUSTER_SLOTS - 1 if n == len(admins) - 1 else (n + 1) * share - 1
                    admin.execute_command("CLUSTER", "ADDSLOTSRANGE", n * share, last)
                for server, bus_port in zip(self.servers[1:], self.bus_ports[1:]):
                    admins[0].execute_command("CLUSTER", "MEET", HOST, server.port, bus_port)
            give_up = time.monotonic() + timeout
            while not all(admin.cluster("info").get("cluster_state") == "ok"
                          and len(admin.cluster("slots")) == len(admins) for admin in admins):
                if time.monotonic() > give_up:
                    raise TimeoutError(f"Redis Cluster on {self.nodes} not ok within {timeout:.0f}s")
                time.sleep(0.1)
        finally:
            for admin in admins:
                admin.close()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "LocalRedisCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="var/redis", help="where the append-only file lives")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--cluster-masters", type=int, default=0,
                        help="start a Redis Cluster of this many masters on free ports instead")
    args = parser.parse_args(argv)
    if args.cluster_masters:
        server = LocalRedisCluster(args.dir, masters=args.cluster_masters).start()
        print(f"Redis Cluster on {','.join(server.nodes)} (data in {args.dir}); PROFILE_STORE=redis "
              f"PROFILE_REDIS_MODE=cluster PROFILE_REDIS_URL={server.url}; EMBEDDING_CATALOGUE_STORE=redis "
              f"EMBEDDING_CATALOGUE_REDIS_MODE=cluster EMBEDDING_CATALOGUE_REDIS_URL={server.catalogue_url}",
              flush=True)
    else:
        server = LocalRedis(args.dir, args.port).start()
        print(f"redis-server on {HOST}:{server.port} (data in {args.dir}, ACL users in {server.acl_file}); "
              f"PROFILE_STORE=redis PROFILE_REDIS_URL={server.url}; "
              f"EMBEDDING_CATALOGUE_STORE=redis EMBEDDING_CATALOGUE_REDIS_URL={server.catalogue_url}",
              flush=True)
    try:
        (server.servers[0] if args.cluster_masters else server).process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
