"""What an oversized request costs the server that refuses it, at the
transport: bytes received, CPU per MiB, memory.

    python bench/oversized_transport.py [--mib 8] [--senders 100] [--seconds 8]
                                        [--limit BYTES] [--option NAME=INT ...] [--server-env NAME=VALUE ...]
                                        [--plaintext]
                                        [--pin auto|none|SERVER/SENDERS] [--json OUT]

A bare grpc.aio server (a process of its own) with the gateway's server
options (recsys_core/rpc/grpc_util.SERVER_OPTIONS and the gateway's
limits.DEFAULTS, the request limit replaced by --limit when given, plus
each --option) and its TLS (a local CA made in a temporary directory, as
`recsys serve` makes one; --plaintext: none), serving one unary method; no
interceptor or servicer of the platform, so what it measures is gRPC's own
handling of the bytes. --senders threads of this process send requests of
--mib MiB to it for --seconds, each again as soon as the last was answered.
Printed: the answers' status codes; the MiB per second the server's
connections received (`ss`'s bytes_received) and per request; the server's
CPU (user + system, every thread) per MiB received and in cores; its peak
resident memory, and what it still holds 2 s after the last request. The server and the senders run on separate CPUs (--pin,
as in bench/abuse.py: default, the server on the lower half of the CPUs,
the senders on the upper half).

It answers whether a server refuses a body over its limit from the
message's length prefix (a refused request would then cost the bytes of a
few frames) or only once it has all of it (the whole body per request:
grpcio 1.81 does the latter, grpc/grpc#43012), and whether an HTTP/2
setting (--option grpc.http2.bdp_probe=0, grpc.http2.lookahead_bytes=16384,
grpc.http2.max_frame_size=16384, grpc.max_concurrent_streams=4) changes it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from abuse import cpu_split, forking_on, bytes_received  # noqa: E402

METHOD = "/bench.Oversized/Call"


def serve(port: int, tls_dir: str, options: list) -> None:
    """The server process: until killed."""
    from recsys_core.rpc.transport import Security

    async def main():
        async def call(request, context):
            return b"ok"

        server = grpc.aio.server(options=[tuple(option) for option in options])
        service, method = METHOD[1:].split("/")
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(call)})])
        if tls_dir:
            credentials = Security.from_dir("gateway", tls_dir).public_server_credentials()
            bound = server.add_secure_port(f"127.0.0.1:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
        if not bound:
            raise OSError(f"could not bind 127.0.0.1:{port}")
        await server.start()
        print("serving", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def server_options(limit: int | None, extra: list[tuple[str, int]]) -> list[tuple[str, int]]:
    from recsys_core.rpc import limits
    from recsys_core.rpc.grpc_util import SERVER_OPTIONS

    gateway = limits.DEFAULTS["gateway"]
    own = dict(limits.server_options(gateway))
    if limit is not None:
        own["grpc.max_receive_message_length"] = limit
    own.update(dict(extra))
    return [*[option for option in SERVER_OPTIONS if option[0] not in own], *own.items()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=8.0, help="size of each request (default 8 MiB)")
    parser.add_argument("--senders", type=int, default=100, help="threads sending (default 100)")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long they send (default 8)")
    parser.add_argument("--limit", type=int, help="the server's request limit in bytes (default: the gateway's)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=INT",
                        help="another server channel argument, e.g. grpc.http2.bdp_probe=0 (repeatable)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server process alone, e.g. "
                             "MALLOC_MMAP_THRESHOLD_=1048576 (repeatable)")
    parser.add_argument("--plaintext", action="store_true", help="no TLS")
    parser.add_argument("--pin", default="auto", help="CPUs, as bench/abuse.py's --pin (default auto)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args) -> dict:
    import psutil

    from recsys_cli.certs import LocalSecurity
    from recsys_cli.stack import free_port
    from recsys_core.rpc.transport import client_channel

    extra = []
    for option in args.option:
        name, _, value = option.partition("=")
        extra.append((name, int(value)))
    options = server_options(args.limit, extra)
    split = cpu_split(args.pin)
    server_cpus, sender_cpus = split if split is not None else (None, None)
    with tempfile.TemporaryDirectory(prefix="recsys-oversized-") as state:
        security = None if args.plaintext else LocalSecurity.ensure(Path(state) / "tls")
        tls_dir = "" if security is None else str(security.tls_dir("gateway"))
        port = free_port()
        with forking_on(server_cpus):
            server_env = {**os.environ, **dict(item.split("=", 1) for item in args.server_env)}
            server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port), tls_dir,
                                       json.dumps(options)], stdout=subprocess.PIPE, text=True, env=server_env)
        if sender_cpus is not None:
            os.sched_setaffinity(0, sender_cpus)
        try:
            if server.stdout.readline().strip() != "serving":
                raise RuntimeError("the server did not start")
            address = f"127.0.0.1:{port}"
            own = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]
            channels = [grpc.insecure_channel(address, options=own) if security is None else
                        client_channel(address, ca=str(security.ca), server_name="gateway", options=own)
                        for _ in range(max(1, args.senders // 25))]
            calls = [channel.unary_unary(METHOD) for channel in channels]
            calls[0](b"ping", timeout=10)
            body = b"\x01" * int(args.mib * 2**20)
            process = psutil.Process(server.pid)
            codes: Counter = Counter()
            lock = threading.Lock()
            stop_at = time.monotonic() + args.seconds

            def send(position: int) -> None:
                call = calls[position % len(calls)]
                while time.monotonic() < stop_at:
                    try:
                        call(body, timeout=30)
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    with lock:
                        codes[code] += 1

            cpu0, received0, begin = sum(process.cpu_times()[:2]), bytes_received(port), time.perf_counter()
            threads = [threading.Thread(target=send, args=(n,), daemon=True) for n in range(args.senders)]
            for thread in threads:
                thread.start()
            peak = 0
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.25)
            seconds = time.perf_counter() - begin
            cpu, received = sum(process.cpu_times()[:2]) - cpu0, bytes_received(port)
            time.sleep(2.0)  # whatever the server frees, it has freed by now
            rss_after = process.memory_info().rss
            for channel in channels:
                channel.close()
        finally:
            server.kill()
            server.wait()
    mib = None if received is None or received0 is None else (received - received0) / 2**20
    requests = sum(codes.values())
    return {
        "settings": {"mib": args.mib, "senders": args.senders, "seconds": args.seconds, "tls": not args.plaintext,
                     "pinning": None if split is None else {"server": sorted(server_cpus),
                                                            "senders": sorted(sender_cpus)}},
        "server_options": dict(options), "server_env": list(args.server_env), "codes": dict(codes), "requests": requests,
        "mib_received_per_s": None if mib is None else round(mib / seconds, 1),
        "bytes_received_per_request": None if mib is None or not requests else round(mib * 2**20 / requests),
        "server_cores": round(cpu / seconds, 3),
        "server_cpu_ms_per_mib": None if not mib else round(cpu * 1000 / mib, 3),
        "server_peak_rss_mib": round(peak / 2**20), "server_rss_after_mib": round(rss_after / 2**20),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        port, tls_dir, options = args.serve
        serve(int(port), tls_dir, json.loads(options))
        return 0
    figures = run(args)
    limit = figures["server_options"]["grpc.max_receive_message_length"]
    print(f"{args.senders} senders x {args.mib:g} MiB for {args.seconds:g} s, {'TLS' if not args.plaintext else 'plaintext'}, "
          f"server limit {limit:,} bytes, pinning {figures['settings']['pinning'] or 'none'}")
    print(f"  answers {figures['codes']}")
    print(f"  the server received {figures['mib_received_per_s']} MiB/s, "
          f"{figures['bytes_received_per_request']} bytes per request "
          f"(the body is {int(args.mib * 2**20):,}: read in full before refusing if about the same)")
    print(f"  server CPU {figures['server_cores']} cores, {figures['server_cpu_ms_per_mib']} ms per MiB received; "
          f"peak RSS {figures['server_peak_rss_mib']} MiB, {figures['server_rss_after_mib']} MiB 2 s after the "
          f"last request; load average {figures['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
