"""Keeps local processes running: what `recsys serve --replicas N` stands on.

Each child runs in a process group of its own, so that what it starts
(Triton's Python backend stubs, a local redis-server) goes with it: when a
child exits, whatever is left in its group is killed before it is started
again, and on stop every group is killed after the drain. Each child also
gets SIGTERM from the kernel if the thread that started it ends
(PR_SET_PDEATHSIG, the pattern of recsys_core/models/triton.py and
recsys_core/store/local_redis.py), so even a `kill -9` of `recsys serve`
leaves no service running (Triton then ends its own stubs on SIGTERM).

A child that exits unexpectedly is started again after a backoff of 0 s,
then 0.5, 1, 2, 4, 8, 15, 30 s for repeated failures, so the first restart
fits the 5 s the platform promises for recovery and a crash loop does not
spin; a child that stayed up `STABLE_SECONDS` starts over at 0 s.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STABLE_SECONDS = 30.0
POLL_SECONDS = 0.05


# The child sets PR_SET_PDEATHSIG itself, then execs the command (the
# setting survives exec): a preexec_fn would run Python between fork and
# exec in a copy of this process, whose other threads (gRPC's, the load's)
# may hold locks; that child crashed with SIGSEGV within 11 ms here.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"  # the parent is already gone
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(command: Sequence[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM when the thread that started it ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def backoff(failures: int) -> float:
    """Seconds before restart number `failures` (0-based) of a child that keeps failing."""
    return BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]


def kill_group(pgid: int | None, sig: int = signal.SIGKILL) -> None:
    """Signals every process still in the group (a child's leftovers)."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """One supervised process: a command in its own process group.

    `tier` orders the stop: lower tiers are stopped (and drained) first."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str], cwd: Path | str, tier: int = 0,
                 address: str = "", health_address: str = ""):
        self.name = name
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.tier = tier
        # Where it serves, and where its plaintext health answers (if apart).
        self.address = address
        self.health_address = health_address or address
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def spawn(self) -> None:
        self.process = subprocess.Popen(dying_with_parent(self.command), env=self.env, cwd=self.cwd,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.running():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """True once the process has exited."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL to the whole group: the process and anything it left."""
        if self.process is not None:
            kill_group(self.process.pid)
            self.process.wait()

    def cleanup(self) -> None:
        """After the process exited: nothing of its group may outlive it."""
        if self.process is not None:
            kill_group(self.process.pid)


class TritonChild(Child):
    """The local Triton server (recsys_core.models.triton.TritonServer): a
    restart keeps its ports, so the embedding replicas find it again, and
    returns once its models are ready."""

    def __init__(self, name: str, server, tier: int = 0):
        super().__init__(name, [], {}, ".", tier=tier, address=server.grpc_url)
        self.server = server

    def spawn(self) -> None:
        self.server.start()
        self.process = self.server.process
        self.started_at = time.monotonic()

    def terminate(self) -> None:
        # SIGTERM to Triton only: it unloads its models and ends its own stubs.
        if self.running():
            self.process.send_signal(signal.SIGTERM)

    def cleanup(self) -> None:
        # Also what stop() of TritonServer does on a dead server: stubs of a
        # killed Triton are still in its group (re-parented to init).
        self.server.stop(timeout=0.1)


class Supervisor:
    """Starts children, restarts those that exit, stops them all in tiers.

    Restarts are on from start(); `restart_on_exit=False` makes a child's
    exit during start-up final (the caller reports it)."""

    def __init__(self):
        self.children: list[Child] = []
        self._stopping = threading.Event()
        # Set once stop() has stopped everything: only then may the watcher
        # threads end, since a child dies with the thread that started it.
        self._stopped = threading.Event()
        self._restarting: set[int] = set()
        self._held: set[int] = set()
        self._released: set[int] = set()
        self._restart_on_exit = threading.Event()
        self._threads: list[threading.Thread] = []
        self._locks: dict[int, threading.Lock] = {}
        self.on_restart: Callable[[Child, int | None], None] | None = None

    def add(self, child: Child) -> Child:
        self.children.append(child)
        self._locks[id(child)] = threading.Lock()
        return child

    def named(self, name: str) -> list[Child]:
        return [c for c in self.children if c.name == name]

    def start(self, restart_on_exit: bool = True) -> None:
        """Spawns every child (Triton first: it blocks until ready), then watches them."""
        if restart_on_exit:
            self._restart_on_exit.set()
        for child in sorted(self.children, key=lambda c: -c.tier):
            with self._locks[id(child)]:
                child.spawn()
            thread = threading.Thread(target=self._watch, args=(child,), name=f"supervise-{child.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def enable_restarts(self) -> None:
        self._restart_on_exit.set()

    def _watch(self, child: Child) -> None:
        try:
            self._supervise(child)
        finally:
            # The children this thread started die with it (PR_SET_PDEATHSIG):
            # it ends only after stop() drained them in order.
            self._stopped.wait()

    def _supervise(self, child: Child) -> None:
        failures = 0
        while not self._stopping.is_set():
            if child.running():
                child.wait(POLL_SECONDS)
                continue
            if self._stopping.is_set():
                return
            code = child.process.returncode if child.process is not None else None
            child.cleanup()
            while id(child) in self._held:
                if self._stopping.wait(POLL_SECONDS):
                    return
            planned = id(child) in self._restarting or id(child) in self._released
            self._released.discard(id(child))
            if not planned and not self._restart_on_exit.is_set():
                log.error("%s (pid %s) exited with code %s while starting", child.name, child.pid, code)
                return
            if planned:
                delay = 0.0
            else:
                if time.monotonic() - child.started_at > STABLE_SECONDS:
                    failures = 0
                delay = backoff(failures)
                failures += 1
                log.warning("%s (pid %s) exited with code %s; restarting in %.1f s", child.name, child.pid, code, delay)
            if self._stopping.wait(delay):
                return
            with self._locks[id(child)]:
                if self._stopping.is_set():
                    return
                try:
                    child.spawn()
                except Exception as error:  # noqa: BLE001 - a failed start is one more failure, retried
                    log.error("%s could not be started again: %s", child.name, error)
                    child.started_at = time.monotonic()
                    continue
                finally:
                    self._restarting.discard(id(child))
                child.restarts += 1
            log.info("%s restarted as pid %s", child.name, child.pid)
            if self.on_restart is not None:
                self.on_restart(child, code)

    def restart(self, child: Child, grace: float = 15.0) -> None:
        """A planned restart (rolling): drain with SIGTERM, start again at once."""
        self._restarting.add(id(child))
        child.terminate()
        if not child.wait(grace):
            child.kill()

    def hold(self, child: Child, grace: float = 15.0) -> None:
        """Stops a child and keeps it stopped (a stage taken down) until release()."""
        self._held.add(id(child))
        child.terminate()
        if not child.wait(grace):
            child.kill()

    def release(self, child: Child) -> None:
        """Starts a held child again, at once."""
        self._released.add(id(child))
        self._held.discard(id(child))

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM tier by tier (gateway first, Triton last), each drained
        within `grace` seconds, then every group killed: nothing left behind."""
        self._stopping.set()
        tiers = sorted({c.tier for c in self.children})
        for tier in tiers:
            members = [c for c in self.children if c.tier == tier]
            for child in members:
                with self._locks[id(child)]:
                    child.terminate()
            deadline = time.monotonic() + grace
            for child in members:
                if not child.wait(max(deadline - time.monotonic(), 0.1)):
                    log.warning("%s (pid %s) did not stop within %.0f s; killing it", child.name, child.pid, grace)
                    child.kill()
                child.cleanup()
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
