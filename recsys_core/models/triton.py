"""Run a real NVIDIA Triton Inference Server on this machine.

The nvidia-pytriton wheel ships a CPU-capable `tritonserver` (Python backend
only) with its shared libraries; this module starts that binary on our model
repository, bound to loopback on free ports, loads every model its backends
can run (not the onnxruntime-backend text_encoder_onnx, nor the ensemble on
it: recsys_core.models.model_repo) and waits until the models are ready. Triton then runs model_repo/text_encoder/1/model.py in a stub process
that embeds this interpreter's Python, which is what the environment set up
here is for.

    with TritonServer() as server:
        encoder = TritonEncoder(server.grpc_url)

CLI: `python -m recsys_core.models.triton [--repo DIR]` serves until SIGTERM or Ctrl-C.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from recsys_core.data import paths
from recsys_core.models import model_repo

if sys.platform == "linux":
    import ctypes

    # Loaded before any fork: the child must not load libraries.
    _libc = ctypes.CDLL(None, use_errno=True)
else:
    _libc = None

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_LIB = "libtriton_python.so"
PYTHON_BACKEND_UTILS = "triton_python_backend_utils.py"


# Triton 2.51 never finishes loading (and HTTP never comes up) when a Python
# stub dies before initialize(), e.g. model.py missing; only the log says so.
_HANG_MARKERS = ("Failed to preinitialize Python stub",)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. If our process is killed
    # outright (SIGKILL, `timeout`), nothing would stop a server in its own
    # session; the kernel sends it SIGTERM instead. Linux only; note it fires
    # when the *thread* that started the server exits.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonStartError(RuntimeError):
    """The server exited or did not get its models ready in time."""


def _pytriton_dir() -> Path:
    # find_spec locates the package without importing it: pytriton's own
    # import pulls in a lot we do not use.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed: it provides the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_dist() -> Path:
    """The wheel's tritonserver folder (bin/, backends/, python_backend_stubs/)."""
    return _pytriton_dir() / "tritonserver"


def wheel_libs_dir() -> Path:
    """Shared libraries auditwheel moved out of the binaries (libtritonserver, libcudart...)."""
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen so the ports differ; another
    # process can still take one before Triton binds it, which start() reports.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def prepare_backend_dir(target: Path) -> Path:
    """A --backend-directory whose python/ holds the backend library, its
    utils module and the stub built for this interpreter's Python version.

    The wheel keeps one stub per Python version apart from the backend, and
    the backend looks for the stub beside itself, so the pieces are linked
    together here. Symlinks keep the wheel's files authoritative.
    """
    dist = tritonserver_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        PYTHON_BACKEND_LIB: dist / "backends" / "python" / PYTHON_BACKEND_LIB,
        PYTHON_BACKEND_UTILS: dist / "backends" / "python" / PYTHON_BACKEND_UTILS,
        STUB_NAME: dist / "python_backend_stubs" / version / STUB_NAME,
    }
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.is_file():
            raise TritonStartError(f"{source} is missing: this nvidia-pytriton has no Python {version} build")
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target


def wheel_backends() -> set[str]:
    """The backends the wheel's tritonserver has: python. (Ensembles need
    none: Triton's core schedules them.)"""
    backends_dir = tritonserver_dist() / "backends"
    return {p.name for p in backends_dir.iterdir() if p.is_dir()} if backends_dir.is_dir() else set()


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and the Python stubs it spawns."""
    env = dict(os.environ if base is None else base)

    def prepend(key: str, *entries: str) -> None:
        existing = [e for e in env.get(key, "").split(os.pathsep) if e]
        env[key] = os.pathsep.join([*entries, *(e for e in existing if e not in entries)])

    # The stub links libpython3.11.so by soname. Without the interpreter's own
    # LIBDIR first, the loader may find a different build (e.g. the distro's
    # /lib/x86_64-linux-gnu copy next to a pyenv interpreter). The wheel's libs
    # folder is reachable through RPATH only from the files' original places.
    prepend("LD_LIBRARY_PATH", str(sysconfig.get_config_var("LIBDIR")), str(wheel_libs_dir()))
    # The embedded Python finds its prefix (and so the venv's site-packages
    # with numpy, onnxruntime, tokenizers) from the first `python3` on PATH.
    prepend("PATH", str(Path(sys.executable).parent))
    # model.py imports recsys_core; a checkout without `pip install -e .`
    # still serves, and the stub's working directory does not matter.
    prepend("PYTHONPATH", str(paths.REPO_ROOT))
    return env


def tracing_args(url: str, service_name: str = "recsys-triton") -> list[str]:
    """tritonserver flags for OpenTelemetry traces of every inference, sent as
    OTLP/HTTP to `url` (a collector's `http://host:4318/v1/traces`). Triton
    continues the trace of a request that carries `traceparent` (our Triton
    client sends it when its service traces): its InferRequest span is then a
    child of the client's ModelInfer span."""
    return ["--trace-config", "mode=opentelemetry", "--trace-config", "level=TIMESTAMPS",
            "--trace-config", "rate=1", "--trace-config", f"opentelemetry,url={url}",
            "--trace-config", f"opentelemetry,resource=service.name={service_name}"]


class TritonServer:
    """A tritonserver subprocess serving `repo`; a context manager.

    start() returns once every model in `models` is ready, or raises
    TritonStartError with the tail of the server log.
    """

    def __init__(
        self,
        repo: Path | str = paths.MODEL_REPO,
        *,
        log_path: Path | str | None = None,
        models: Sequence[str] = (paths.TEXT_ENCODER_MODEL,),
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ):
        self.repo = Path(repo).resolve()
        self.models = tuple(models)
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        # Default: a log in the scratch folder start() creates.
        self.log_path: Path | None = Path(log_path) if log_path else None
        self._workdir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def process(self) -> subprocess.Popen | None:
        return self._process

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def loadable_models(self) -> list[str]:
        """The repository's models this server loads: those its backends run."""
        return model_repo.loadable_models(model_repo.model_configs(self.repo), wheel_backends())

    def _command(self) -> list[str]:
        backend_dir = prepare_backend_dir(self._workdir / "backends")
        # Explicit mode loading what the wheel's backends run: with
        # --model-control-mode=none Triton would try every model of the
        # repository and exit on the first whose backend it lacks.
        loads = [f"--load-model={name}" for name in self.loadable_models()]
        return [
            str(tritonserver_dist() / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir}",
            # Triton binds 0.0.0.0 by default; this server is for local callers.
            f"--http-address={HOST}",
            f"--grpc-address={HOST}",
            f"--metrics-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            *loads,
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            # In-flight requests get this long after SIGTERM; stop() waits a bit more.
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if self.is_running():
            return self
        if not self.repo.is_dir():
            raise TritonStartError(f"model repository {self.repo} does not exist")
        unloadable = sorted(set(self.models) - set(self.loadable_models()))
        if unloadable:
            raise TritonStartError(
                f"this tritonserver cannot load {unloadable} from {self.repo}: no such model, or its backend "
                f"(or an ensemble step's) is not among {sorted(wheel_backends())}")
        # Started again after stop() (or a crash), it keeps its ports: its
        # clients (the embedding service) find it where it was.
        if not self.grpc_port:
            self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        self._workdir = Path(tempfile.mkdtemp(prefix="recsys-triton-"))
        if self.log_path is None:
            self.log_path = self._workdir / "tritonserver.log"
        command = self._command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        started = time.monotonic()
        self._process = subprocess.Popen(
            command,
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own session: a terminal's Ctrl-C reaches only us, and we shut
            # the server down in order; a kill of the group also takes the stubs.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.info("tritonserver pid %d starting, log %s", self._process.pid, self.log_path)
        try:
            self._wait_ready(started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("tritonserver ready in %.1f s on grpc %s", time.monotonic() - started, self.grpc_url)
        return self

    def _wait_ready(self, deadline: float) -> None:
        pending = list(self.models)
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonStartError(f"tritonserver exited with code {code} during startup:\n{self.log_tail()}")
            log_text = self.log_tail(lines=200)
            if any(marker in log_text for marker in _HANG_MARKERS):
                raise TritonStartError(f"a Python model failed before initialize():\n{self.log_tail()}")
            pending = [m for m in pending if not self._http_ok(f"/v2/models/{m}/ready")]
            if not pending and self._http_ok("/v2/health/ready"):
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {self.startup_timeout:.0f} s "
                    f"(waiting for {pending or 'server'}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after `timeout` seconds.
        Returns the exit code, or None if it was never started."""
        process, self._process = self._process, None
        code = None
        if process is not None:
            if process.poll() is None:
                # SIGTERM, not SIGINT: a background job of a non-interactive
                # shell starts with SIGINT ignored, and Triton honours both.
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver ignored SIGTERM for %.0f s; killing it", timeout)
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait()
            code = process.returncode
            # Whatever is left of its group: a Triton that was killed (or
            # crashed) leaves its Python backend stubs running, re-parented
            # to init; they are still in its process group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # A default log lives in the scratch folder and is kept for post-mortems.
        if self._workdir is not None:
            if self._workdir in self.log_path.parents:
                shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_core.models.triton", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=paths.MODEL_REPO, help="model repository")
    parser.add_argument("--log-file", type=Path, help="server log (default: a temp file)")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    server = TritonServer(args.repo, log_path=args.log_file, startup_timeout=args.startup_timeout)
    try:
        server.start()
    except TritonStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(server.grpc_url, flush=True)
    print(f"http {server.http_url}  metrics {server.metrics_url}  log {server.log_path}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            if not server.is_running():
                print(f"tritonserver exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
