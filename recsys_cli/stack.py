"""All services as local processes: what `recsys serve` and the benchmarks run."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys_cli.certs import ADMIN_TOKEN_FILE, LocalSecurity
from recsys_cli.supervisor import Child, Supervisor, TritonChild
from recsys_core.data import paths
from recsys_core.rpc.envconfig import EnvReader
from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS
from recsys_core.rpc.limits import service_limits
from recsys_core.rpc.transport import CERT_FILE, KEY_FILE, Security, client_channel

log = logging.getLogger(__name__)
SERVICES = ("embedding", "profile", "ranking", "gateway")
# What the stack waits on and the benchmarks watch: the services and, when on, recsys-edge.
PROCESSES = (*SERVICES, "edge")
# Stop order (supervisor tiers): the gateway first, so no new work reaches
# the others while they drain; Triton last, as embedding may still need it.
TIERS = {"edge": -1, "gateway": 0, "embedding": 1, "profile": 1, "ranking": 1, "triton": 2}
TRANSPORTS = ("mtls", "mtls-plaintext-gateway", "plaintext")
# Which shoppers belong to which tenant: retail customers and the Amazon benchmark's.
LOCAL_TENANTS = "retail=retail-,amazon="


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(address: str, timeout: float, process: subprocess.Popen | None = None,
                       channel: Callable[[], grpc.Channel] | None = None) -> None:
    """Poll standard health until SERVING; fail early if the process died.
    `channel` makes the channel to ask on (default: plaintext; a service with
    mTLS needs a client certificate of its CA even for health)."""
    give_up = time.monotonic() + timeout
    with (channel() if channel is not None else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service at {address} exited with code {process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"the service at {address} was not SERVING after {timeout:.0f}s")
            time.sleep(0.3)


@dataclass
class LocalStack:
    data_dir: Path = paths.BUNDLED_DATA_DIR
    # Online-retail invoices: shoppers with money (churn and lifetime value); None: none.
    retail_dir: Path | None = paths.BUNDLED_RETAIL_DIR
    gateway_port: int = 50051
    state_dir: Path = paths.REPO_ROOT / "var"
    # "triton": the encoder on a local Triton server; "onnx": in the embedding service.
    encoder: str = "triton"
    model_repo: Path = paths.MODEL_REPO
    # A trained model directory (recsys train --out): Triton serves its encoder
    # and user tower from a repository built for it (model_repo/ itself is
    # never changed), the catalogue is indexed with them, profiles carry its
    # shopper vector. None: the pretrained encoder alone.
    model_dir: Path | None = None
    # Transport: "mtls" (mTLS between services, TLS at the gateway), "mtls-plaintext-gateway"
    # (the gateway's port in plaintext: grpcurl -plaintext), "plaintext" (nothing encrypted,
    # development only). Certificates and the token key are made once into state_dir/tls.
    transport: str = "mtls"
    # OpenTelemetry spans of every service (recsys_core/rpc/tracing.py): "off",
    # "otlp" (to tracing_endpoint, else OTEL_EXPORTER_OTLP_ENDPOINT, else
    # http://localhost:4317), "file" (JSON lines in state_dir/traces/<service>.jsonl)
    # or "console" (each service's stdout). Off: the services' own environment decides.
    tracing: str = "off"
    tracing_endpoint: str = ""
    tracing_sample_ratio: float | None = None
    # Triton's own spans (OTLP/HTTP, e.g. http://localhost:4318/v1/traces), which
    # continue the embedding service's trace; empty: Triton traces nothing.
    triton_tracing_url: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    # Processes per service (`recsys serve --replicas N`): each on a port of
    # its own, its callers balancing over all of them with round_robin on a
    # static list (`ipv4:127.0.0.1:p1,127.0.0.1:p2`); the gateway's replicas
    # share the public port (SO_REUSEPORT, which gRPC servers set: the kernel
    # spreads connections over them as a Service would) and each answers
    # health on a plaintext port of its own. profile runs one process unless
    # its store is shared (PROFILE_STORE=redis): SQLite has one writer.
    replicas: int = 1
    # Restart a service that exits (with backoff: recsys_cli/supervisor.py).
    restart: bool = True
    # A local redis-server (state_dir/redis, durable, with the services' ACL
    # users) holding profile's events and counts (PROFILE_STORE=redis, so
    # profile runs `replicas` processes too) and the catalogue
    # (EMBEDDING_CATALOGUE_STORE=redis): the Kubernetes layout on one machine.
    # False: SQLite files, no Redis needed (the embedded default).
    redis: bool = False
    redis_server: object | None = None
    # recsys-edge (edge/main.go) on the public port, the gateway behind it on
    # loopback: an oversized request is refused from its length prefix before
    # its body is read (grpcio reads a body whole first). TLS at the edge when
    # the gateway would have had it.
    edge: bool = False
    addresses: dict[str, str] = field(default_factory=dict)
    # Each replica's own address (its health address for the gateway).
    replica_addresses: dict[str, list[str]] = field(default_factory=dict)
    supervisor: Supervisor = field(default_factory=Supervisor)
    triton: object | None = None
    serving_repo: Path | None = None
    security: LocalSecurity | None = None
    admin_token: str = ""

    def prepare_security(self) -> LocalSecurity:
        """The CA, certificates and token key in state_dir/tls (reused while
        valid), and an admin token (also in state_dir/tls/admin.token)."""
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.security is None:
            self.security = LocalSecurity.ensure(Path(self.state_dir) / "tls")
            self.security.write_admin_token()
            self.admin_token = (self.security.directory / ADMIN_TOKEN_FILE).read_text().strip()
        return self.security

    @property
    def gateway_tls(self) -> bool:
        return self.transport == "mtls"

    def describe_transport(self) -> str:
        between = "mTLS between services" if self.transport != "plaintext" else \
            "PLAINTEXT between services (development only: nothing encrypted, identities not verified)"
        at = "TLS" if self.gateway_tls else "plaintext"
        if self.edge:
            return (f"{between}, {at} at recsys-edge on {self.addresses.get('gateway', '?')} (requests over "
                    f"its limit refused unread), the gateway behind it on {self.addresses.get('gateway-upstream')}")
        return f"{between}, {at} at the gateway on {self.addresses.get('gateway', '?')}"

    def channel(self, name: str, token: str | None = "admin") -> grpc.Channel:
        """A channel to one of the stack's services as its operator: the gateway
        with the admin token; the others with the `admin` certificate and token."""
        security = self.prepare_security()
        token = self.admin_token if token == "admin" else token
        address = self.addresses[name]
        if name == "gateway":
            if not self.gateway_tls:
                return client_channel(address, plaintext=True, token=token, options=CHANNEL_OPTIONS)
            return client_channel(address, ca=str(security.ca), token=token, server_name="gateway",
                                  options=CHANNEL_OPTIONS)
        transport = Security.plaintext("admin") if self.transport == "plaintext" else security.security("admin")
        return transport.channel(address, name, CHANNEL_OPTIONS, token=token)

    def ghz_args(self, name: str) -> list[str]:
        """ghz flags to call service `name` of this stack (its configs carry no transport)."""
        security = self.prepare_security()
        return security.ghz_args(name, token=self.admin_token,
                                 plaintext=(self.transport == "plaintext" or name == "gateway" and not self.gateway_tls))

    def replica_count(self, name: str) -> int:
        if name == "profile" and not self.redis:
            store = self.extra_env.get("PROFILE_STORE", os.environ.get("PROFILE_STORE", "sqlite"))
            return self.replicas if store == "redis" else 1
        return self.replicas

    def environment(self) -> dict[str, str]:
        """The environment every process shares; `replica_environments` adds each one's own ports."""
        ports = {"gateway": [free_port() if self.edge else self.gateway_port],
                 **{name: [free_port() for _ in range(self.replica_count(name))]
                    for name in ("embedding", "profile", "ranking")}}
        # What callers dial: one address, or a static list round_robin balances over.
        for name, replica_ports in ports.items():
            listed = [f"127.0.0.1:{port}" for port in replica_ports]
            self.addresses[name] = listed[0] if len(listed) == 1 else "ipv4:" + ",".join(listed)
            self.replica_addresses[name] = listed
        self._ports = ports
        if self.edge:
            # Callers dial the edge; the gateway's own port is for the edge alone.
            self.addresses["gateway-upstream"] = self.addresses["gateway"]
            self.addresses["gateway"] = f"127.0.0.1:{self.gateway_port}"
        if self.replica_count("gateway") > 1:
            self._gateway_health = [free_port() for _ in range(self.replica_count("gateway"))]
            self.replica_addresses["gateway"] = [f"127.0.0.1:{port}" for port in self._gateway_health]
        # Each process its own Prometheus endpoint: "<service>-metrics" -> host:port (GET /metrics),
        # "<service>-<i>-metrics" for replica i > 0.
        self._metrics = {name: [free_port() for _ in range(self.replica_count(name))] for name in SERVICES}
        for name, metrics_ports in self._metrics.items():
            for index, port in enumerate(metrics_ports):
                self.addresses[f"{name}-metrics" if index == 0 else f"{name}-{index}-metrics"] = f"127.0.0.1:{port}"
        # Each data set gets its own store, so switching --data never mixes events.
        store = self.state_dir / f"profile-{Path(self.data_dir).resolve().name}.sqlite3"
        security = self.prepare_security()
        env = dict(os.environ)
        for name in SERVICES:
            prefix = name.upper() + "_"
            if self.transport == "plaintext":
                env[prefix + "INSECURE"] = "1"
            else:
                env[prefix + "TLS_DIR"] = str(security.tls_dir(name))
            env[prefix + "AUTH_JWT_KEY_FILE"] = str(security.jwt_key)
            env[prefix + "AUTH_TENANTS"] = LOCAL_TENANTS
            # Local development: grpcurl and ghz may describe the API.
            env[prefix + "REFLECTION"] = "1"
        # Behind the edge the gateway's port is loopback, and TLS ends at the edge.
        env["GATEWAY_PUBLIC_TLS"] = "true" if self.gateway_tls and not self.edge else "false"
        env.update(self.tracing_environment())
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "EMBEDDING_DATA_DIR": str(self.data_dir),
            "EMBEDDING_RETAIL_DIR": str(self.retail_dir or ""),
            "PROFILE_RETAIL_DIR": str(self.retail_dir or ""),
            "PROFILE_DATA_DIR": str(self.data_dir),
            "PROFILE_STORE_PATH": str(store),
            # One catalogue store per data set, as the profile's, unless the
            # caller names one; every embedding replica of the stack opens the same file.
            "EMBEDDING_CATALOGUE_PATH": os.environ.get("EMBEDDING_CATALOGUE_PATH") or str(
                self.state_dir / f"catalogue-{Path(self.data_dir).resolve().name}.sqlite3"),
            "PROFILE_EMBEDDING_ADDRESS": self.addresses["embedding"],
            "GATEWAY_PROFILE_ADDRESS": self.addresses["profile"],
            "GATEWAY_EMBEDDING_ADDRESS": self.addresses["embedding"],
            "GATEWAY_RANKING_ADDRESS": self.addresses["ranking"],
        })
        env["EMBEDDING_ENCODER"] = self.encoder
        env["EMBEDDING_MODEL_REPO"] = str(self.serving_repo or self.model_repo)
        if self.triton is not None:
            env["EMBEDDING_TRITON_URL"] = self.triton.grpc_url
            env["PROFILE_REVIEW_TRITON_URL"] = self.triton.grpc_url
        if self.model_dir is not None:
            env["EMBEDDING_MODEL_DIR"] = str(self.model_dir)
            env["PROFILE_USER_TOWER_TRITON_URL"] = self.triton.grpc_url
        if self.redis_server is not None:
            env.update({"PROFILE_STORE": "redis", "PROFILE_REDIS_URL": self.redis_server.url,
                        "EMBEDDING_CATALOGUE_STORE": "redis",
                        "EMBEDDING_CATALOGUE_REDIS_URL": self.redis_server.catalogue_url})
        env.update(self.extra_env)
        return env

    @property
    def trace_dir(self) -> Path:
        return Path(self.state_dir) / "traces"

    def tracing_environment(self) -> dict[str, str]:
        """<SERVICE>_TRACING* for every service, as `tracing` says; nothing when off."""
        if self.tracing == "off":
            return {}
        env = {}
        if self.tracing == "file":
            self.trace_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            prefix = name.upper() + "_TRACING"
            env[prefix] = self.tracing
            if self.tracing_endpoint:
                env[prefix + "_ENDPOINT"] = self.tracing_endpoint
            if self.tracing_sample_ratio is not None:
                env[prefix + "_SAMPLE_RATIO"] = str(self.tracing_sample_ratio)
            if self.tracing == "file":
                env[prefix + "_FILE"] = str(self.trace_dir / f"{name}.jsonl")
        return env

    def describe_tracing(self) -> str:
        if self.tracing == "off":
            return "off (recsys serve --tracing otlp|file|console turns it on)" + (
                f"; Triton's own to {self.triton_tracing_url}" if self.triton_tracing_url else "")
        endpoint = self.tracing_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4317"
        where = {"otlp": f"OTLP/gRPC to {endpoint}", "file": f"JSON lines in {self.trace_dir}/<service>.jsonl",
                 "console": "each service's stdout"}[self.tracing]
        ratio = "" if self.tracing_sample_ratio is None else f", {self.tracing_sample_ratio:g} of traces sampled"
        triton = f"; Triton's own spans to {self.triton_tracing_url}" if self.triton_tracing_url else ""
        return f"every service, {where}{ratio}{triton}"

    def replica_environments(self, name: str, env: dict[str, str]) -> list[dict[str, str]]:
        """Replica i of `name`: its address and metrics port (gateway: its health port)."""
        prefix, count = name.upper() + "_", self.replica_count(name)
        environments = []
        for index in range(count):
            own = dict(env)
            port = self._ports[name][0 if name == "gateway" else index]
            own[prefix + "ADDRESS"] = f"127.0.0.1:{port}"
            own[prefix + "METRICS_PORT"] = str(self._metrics[name][index])
            if name == "gateway" and count > 1:
                own["GATEWAY_HEALTH_PORT"] = str(self._gateway_health[index])
            environments.append(own)
        return environments

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The first replica's process of each service (what the benchmarks watch)."""
        first = {}
        for child in self.supervisor.children:
            if child.name in PROCESSES and child.process is not None:
                first.setdefault(child.name, child.process)
        return first

    def children(self, name: str) -> list[Child]:
        return self.supervisor.named(name)

    def replica_channel(self, child: Child) -> grpc.Channel:
        """A channel to one replica, for its health: plaintext to a gateway replica's health port."""
        if child.name == "gateway" and (child.health_address != child.address or self.edge):
            return grpc.insecure_channel(child.health_address)
        if child.name in ("gateway", "edge"):
            # The edge answers health as the gateway behind it does.
            return self.channel("gateway", token=None)
        security = self.prepare_security()
        transport = Security.plaintext("admin") if self.transport == "plaintext" else security.security("admin")
        return transport.channel(child.address, child.name, CHANNEL_OPTIONS)

    def wait_serving(self, child: Child, timeout: float) -> None:
        """Until `child` answers SERVING; Triton's restart itself waits for its models."""
        if isinstance(child, TritonChild):
            if not child.server.is_running():
                raise RuntimeError(f"Triton at {child.address} is not running")
            return
        wait_until_serving(child.health_address, timeout, child.process, channel=lambda: self.replica_channel(child))

    def start(self, timeout: float = 1800.0) -> None:
        repo, models = self.model_repo, [paths.TEXT_ENCODER_MODEL]
        if self.model_dir is not None:
            from recsys_core.models import model_serving

            # Checked before anything starts: a bad directory is one clear error.
            model = model_serving.open_model_dir(self.model_dir)
            self.model_dir = model.path
            repo = self.serving_repo = Path(self.state_dir) / "serving_model_repo"
            model_serving.serving_repository(model, repo, base=self.model_repo)
            models.append(model_serving.USER_TOWER_MODEL)
        # The user tower runs on Triton whichever way the encoder runs.
        if self.encoder == "triton" or self.model_dir is not None:
            from recsys_core.models.triton import TritonServer, tracing_args

            log.info("starting Triton Inference Server on %s", repo)
            traced = tracing_args(self.triton_tracing_url) if self.triton_tracing_url else ()
            self.triton = TritonServer(repo, log_path=Path(self.state_dir) / "triton.log", models=models,
                                       startup_timeout=180.0 if self.model_dir is not None else 60.0,
                                       extra_args=traced).start()
            self.addresses["triton"] = self.triton.grpc_url
            self.addresses["triton-metrics"] = f"127.0.0.1:{self.triton.metrics_port}"
            log.info("Triton ready at %s (log %s)", self.triton.grpc_url, self.triton.log_path)
        if self.redis and self.redis_server is None:
            from recsys_core.store.local_redis import LocalRedis

            self.redis_server = LocalRedis(Path(self.state_dir) / "redis").start()
            self.addresses["redis"] = f"127.0.0.1:{self.redis_server.port}"
            log.info("redis-server on %s (log %s)", self.addresses["redis"], self.redis_server.log_path)
        env = self.environment()
        if self.triton is not None:
            self.supervisor.add(TritonChild("triton", self.triton, tier=TIERS["triton"]))
        for name in SERVICES:
            for own, address in zip(self.replica_environments(name, env), self.replica_addresses[name]):
                self.supervisor.add(Child(name, [sys.executable, "-m", f"services.{name}.server"], own,
                                          paths.REPO_ROOT, tier=TIERS[name],
                                          address=own[name.upper() + "_ADDRESS"], health_address=address))
        if self.edge:
            self.supervisor.add(self.edge_child(env))
        try:
            # Exits while starting are errors to report, not to retry.
            self.supervisor.start(restart_on_exit=False)
            for child in self.supervisor.children:
                if child.name in PROCESSES:
                    self.wait_serving(child, timeout)
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self.supervisor.enable_restarts()

    def edge_child(self, env: dict[str, str]) -> Child:
        """recsys-edge on the public port, in front of the gateway's loopback port."""
        from recsys_cli.edge import edge_binary

        edge_env = {key: value for key, value in env.items() if not key.startswith("EDGE_")}
        edge_env.update({
            "EDGE_ADDRESS": self.addresses["gateway"],
            "EDGE_UPSTREAM": self.addresses["gateway-upstream"],
            # The gateway's own limit (its default, or GATEWAY_MAX_REQUEST_BYTES), so both refuse the same requests.
            "EDGE_MAX_REQUEST_BYTES": str(service_limits(EnvReader("GATEWAY_", env), "gateway").max_request_bytes),
        })
        if self.gateway_tls:
            gateway_tls = self.prepare_security().tls_dir("gateway")
            edge_env.update({"EDGE_TLS_CERT": str(gateway_tls / CERT_FILE), "EDGE_TLS_KEY": str(gateway_tls / KEY_FILE)})
        else:
            edge_env["EDGE_INSECURE"] = "1"
        edge_env.update({key: value for key, value in self.extra_env.items() if key.startswith("EDGE_")})
        return Child("edge", [str(edge_binary())], edge_env, paths.REPO_ROOT, tier=TIERS["edge"],
                     address=self.addresses["gateway"])

    def pids(self) -> dict[str, int]:
        pids = {name: process.pid for name, process in self.processes.items()}
        if self.triton is not None and self.triton.pid is not None:
            pids["triton"] = self.triton.pid
        return pids

    def stop(self, grace: float = 15.0) -> None:
        """Drains and stops every process, gateway first, Triton last; kills
        what did not stop within `grace`, and anything their groups left."""
        self.supervisor.stop(grace)
        if self.triton is not None:
            self.triton.stop()
        if self.redis_server is not None:
            # Last: the services drained into it.
            self.redis_server.stop()

    def __enter__(self) -> "LocalStack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(data: Path, port: int, encoder: str, model_dir: Path | None, retail: Path | None,
          show_example: bool, transport: str = "mtls", tracing: str = "off", tracing_endpoint: str = "",
          tracing_sample_ratio: float | None = None, triton_tracing_url: str = "", replicas: int = 1,
          redis: bool = False, edge: bool = True) -> int:
    """`recsys serve`: the whole stack on this machine until SIGTERM or Ctrl-C,
    with an example shopper's recommendations and profile once it is up."""
    from recsys_cli.client import call_profile, call_recommend, example_shopper, print_profile, print_recommendations

    logging.basicConfig(level=logging.INFO, format="%(asctime)s recsys %(message)s")
    data_dir = Path(data).resolve()
    model = None
    edge_note = ""
    if edge:
        from recsys_cli.edge import EdgeUnavailable, edge_binary

        try:
            edge_binary()
        except EdgeUnavailable as error:
            edge, edge_note = False, f"edge: OFF ({error}): oversized requests reach the gateway, which reads each whole"
    if model_dir is not None:
        from recsys_core.models.model_serving import ModelDirError, open_model_dir, serves_model

        try:
            model = open_model_dir(model_dir)
        except ModelDirError as error:
            print(f"recsys serve: --model: {error}", file=sys.stderr)
            return 2
        if not serves_model(model.manifest):
            guard = model.manifest["guard"]
            print(f"recsys serve: --model {model_dir}: its training guard held it back (validation "
                  f"{guard['valid']['trained']} against the untrained path's {guard['valid']['untrained']}); "
                  "serving without a trained model", file=sys.stderr)
            model = None
    stack = LocalStack(data_dir=data_dir, gateway_port=port, encoder=encoder,
                       model_dir=model.path if model else None,
                       retail_dir=Path(retail).resolve() if retail else None, transport=transport,
                       tracing=tracing, tracing_endpoint=tracing_endpoint, tracing_sample_ratio=tracing_sample_ratio,
                       triton_tracing_url=triton_tracing_url, replicas=replicas, redis=redis, edge=edge)
    stop, started = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        if not started.is_set():
            # Starting can take minutes (the catalogue's index, Triton): a stop
            # asked for meanwhile stops what has started, now.
            raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = "a local Triton Inference Server" if encoder == "triton" else "onnxruntime in the embedding service"
    if model is not None:
        print(f"serving the model {model.path} (trained on {', '.join(model.manifest.get('categories', []))}): "
              f"its encoder indexes the catalogue, its user tower on Triton gives shoppers' vectors", flush=True)
    print(f"starting the encoder on {where}, then profile, embedding, ranking and gateway on {data_dir} ...",
          flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError, ValueError) as error:
        print(f"recsys serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupted:
        # LocalStack.start stopped every process it had started.
        print(f"recsys serve: {interrupted or 'interrupted'} while starting; stopped", file=sys.stderr)
        return 130
    started.set()
    gateway = stack.addresses["gateway"]
    print(f"\nall services SERVING; gateway at {gateway}", flush=True)
    # Operators' and `recsys evaluate --served --profile` need the internal ones too.
    print("internal: " + ", ".join(f"{name} {stack.addresses[name]}" for name in ("profile", "embedding", "ranking")),
          flush=True)
    if replicas > 1:
        print("replicas (each restarted if it exits): " + ", ".join(
            f"{name} {len(stack.children(name))}" for name in SERVICES) +
            ("" if stack.replica_count("profile") == replicas else
             " (profile: one process, its SQLite store has one writer; PROFILE_STORE=redis shares one)"), flush=True)
    tls = stack.security.directory
    print(f"transport: {stack.describe_transport()}", flush=True)
    if edge_note:
        print(edge_note, flush=True)
    print(f"tracing: {stack.describe_tracing()}", flush=True)
    print(f"certificates: {tls} (CA {tls / 'ca.crt'}); admin token: {tls / ADMIN_TOKEN_FILE} "
          f"(`recsys` commands read both from there)", flush=True)
    if stack.gateway_tls:
        print(f"grpcurl -cacert {tls / 'ca.crt'} -H \"authorization: Bearer $(cat {tls / ADMIN_TOKEN_FILE})\" "
              f"{gateway} list", flush=True)
    else:
        print(f"grpcurl -plaintext -H \"authorization: Bearer $(cat {tls / ADMIN_TOKEN_FILE})\" {gateway} list",
              flush=True)
    if stack.triton is not None:
        print(f"Triton gRPC at {stack.triton.grpc_url}, metrics at {stack.triton.metrics_url}", flush=True)
    print("Prometheus metrics: " + ", ".join(
        f"{name.removesuffix('-metrics')} http://{address}/metrics"
        for name, address in stack.addresses.items() if name.endswith("-metrics") and name != "triton-metrics"
    ), flush=True)
    if show_example:
        shopper = example_shopper(data_dir)
        print(f"\nrecommendations for shopper {shopper} (recsys recommend {shopper}):")
        try:
            print_recommendations(call_recommend(gateway, shopper, 10, [], None, channel=stack.channel("gateway")),
                                  as_json=False)
            print(f"\nprofile of shopper {shopper} (recsys profile {shopper}):")
            print_profile(call_profile(gateway, shopper, 10, None, channel=stack.channel("gateway")))
        except Exception as error:  # noqa: BLE001 - the services keep running
            print(f"example request failed: {error}", file=sys.stderr)
    print("\nserving until Ctrl-C or SIGTERM", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    stack.stop()
    return 0


def run_script(name: str, work, expected_errors: tuple[type[BaseException], ...]) -> int:
    """A benchmark or load-test script's main: SIGTERM stops it like Ctrl-C
    (its `finally` blocks stop the stack; exit 130), and an expected failure
    prints one line instead of a traceback (exit 1)."""

    def terminate(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, terminate)
    try:
        return work()
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    except expected_errors as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
