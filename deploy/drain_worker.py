#!/usr/bin/env python3
"""Drain a worker and wait until it has stopped: the Kubernetes preStop hook of worker pods.

``llmserve-drain 127.0.0.1:50061`` calls ``WorkerControl.Drain`` on the worker, which at once
marks itself draining in Redis (routers stop sending it requests within a registry refresh,
about a second), turns its health NOT_SERVING (the pod leaves the Service endpoints) and refuses
new streams, while the streams in flight run to their end. The worker gives them its
``--drain-grace-s`` (or ``--grace-s`` here), aborts what is left after that, and closes its
server. This script returns once the server no longer answers, so the SIGTERM that the kubelet
sends after the hook finds nothing left to cut.

Exit status 0 when the worker has stopped (or was not running), 1 on a timeout or an error.
Only ``grpcio`` and the generated ``llmserve.v1`` code are needed, both in the worker image.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from llmserve.v1 import internal_pb2, internal_pb2_grpc

# Codes that mean "nothing answers on that port any more": the worker has stopped.
_GONE = (grpc.StatusCode.UNAVAILABLE,)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmserve-drain",
        description="Ask the worker at ADDRESS to drain (WorkerControl.Drain) and wait until it stops.",
    )
    parser.add_argument("address", nargs="?", default="127.0.0.1:50061", help="host:port of the worker")
    parser.add_argument("--grace-s", type=float, default=0.0,
                        help="seconds in-flight streams get before they are aborted (0: the worker's "
                             "--drain-grace-s)")
    parser.add_argument("--timeout-s", type=float, default=0.0,
                        help="give up waiting after this long (0: wait until the worker stops; the "
                             "kubelet's terminationGracePeriodSeconds bounds the hook anyway)")
    parser.add_argument("--poll-s", type=float, default=1.0, help="seconds between progress checks")
    args = parser.parse_args(argv)
    if args.grace_s < 0 or args.timeout_s < 0 or args.poll_s <= 0:
        parser.error("--grace-s and --timeout-s must be >= 0, --poll-s > 0")
    return args


def start_drain(stub: internal_pb2_grpc.WorkerControlStub, grace_s: float) -> int | None:
    """Start the drain; the number of requests in flight, or None when no worker answers."""
    try:
        reply = stub.Drain(internal_pb2.DrainRequest(grace_period_s=grace_s), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() in _GONE:
            return None
        raise
    return int(reply.in_flight)


def wait_stopped(stub: internal_pb2_grpc.WorkerControlStub, timeout_s: float, poll_s: float) -> bool:
    """Poll until the worker stops answering (True) or ``timeout_s`` passes (False; 0 = never)."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    last = None
    while deadline is None or time.monotonic() < deadline:
        try:
            info = stub.GetWorkerInfo(internal_pb2.GetWorkerInfoRequest(), timeout=max(poll_s, 1.0))
        except grpc.RpcError as exc:
            if exc.code() in _GONE:
                return True
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        else:
            now = (info.load.num_running, info.load.num_waiting)
            if now != last:
                print(f"draining: {now[0]} running, {now[1]} waiting", flush=True)
                last = now
        time.sleep(poll_s)
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Always a local or in-cluster address: never route it through a proxy.
    with grpc.insecure_channel(args.address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = internal_pb2_grpc.WorkerControlStub(channel)
        try:
            in_flight = start_drain(stub, args.grace_s)
            if in_flight is None:
                print(f"{args.address}: no worker answers; nothing to drain")
                return 0
            print(f"{args.address}: draining, {in_flight} requests in flight", flush=True)
            if wait_stopped(stub, args.timeout_s, args.poll_s):
                print(f"{args.address}: drained and stopped")
                return 0
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}: still serving after {args.timeout_s:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
