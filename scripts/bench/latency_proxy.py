#!/usr/bin/env python3
"""A latency-injecting TCP proxy for the benchmark (stdlib only; no kernel netem here).

Like toxiproxy's latency toxic: every chunk read from one side is written to the other side
`--delay-ms` after it was read, in order, in both directions, so a round trip through the proxy
costs twice the delay on top of the real one. Reading goes on while earlier chunks wait (a
bounded amount per direction: the bytes in flight of a long fat pipe), so the delay adds latency,
not a bandwidth cap of chunk/delay. TLS passes through untouched (the proxy sees only bytes).

    latency_proxy.py --target 127.0.0.1:5000 --delay-ms 25 --port-file F --log F
    latency_proxy.py --selftest [--delay-ms 25] [--mib 512]   # its own throughput, no registry

The log gets one line `open <n>` per accepted connection (the benchmark counts them per run) and
`bytes <up> <down>` totals when a connection ends.
"""

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

CHUNK = 256 * 1024
# Bytes read but not yet written, per direction: 64 MiB covers 2.5 GB/s x 25 ms.
IN_FLIGHT = 64 * 1024 * 1024


class Direction:
    """One direction of one connection: read, stamp, hold `delay`, write."""

    def __init__(self, reader, writer, delay):
        self.reader, self.writer, self.delay = reader, writer, delay
        self.queue = asyncio.Queue()
        self.in_flight = 0
        self.room = asyncio.Event()
        self.room.set()
        self.bytes = 0

    async def read_loop(self):
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                self.in_flight += len(data)
                if self.in_flight >= IN_FLIGHT:
                    self.room.clear()
                self.queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            self.queue.put_nowait((0.0, None))

    async def write_loop(self):
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await self.queue.get()
                if data is None:  # the reading side broke: abort
                    self.writer.transport.abort()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.bytes += len(data)
                self.in_flight -= len(data)
                if self.in_flight < IN_FLIGHT:
                    self.room.set()
        except (ConnectionError, OSError):
            self.writer.transport.abort()


class Proxy:
    def __init__(self, target, delay, log=None):
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.delay = delay
        self.log = log
        self.opened = 0

    def note(self, line):
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    async def handle(self, c_reader, c_writer):
        self.opened += 1
        self.note(f"open {self.opened}")
        try:
            s_reader, s_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            c_writer.transport.abort()
            return
        for w in (c_writer, s_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = Direction(c_reader, s_writer, self.delay)
        down = Direction(s_reader, c_writer, self.delay)
        await asyncio.gather(up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop())
        for w in (c_writer, s_writer):
            w.transport.abort() if w.transport.is_closing() else w.close()
        self.note(f"bytes {up.bytes} {down.bytes}")

    async def serve(self, port=0):
        server = await asyncio.start_server(self.handle, "127.0.0.1", port, limit=CHUNK * 2)
        return server, server.sockets[0].getsockname()[1]


async def selftest(delay, mib):
    """Pushes `mib` MiB through the proxy to a sink and back-pressure-free reads; returns MB/s
    of one connection and of four at once."""
    async def sink(reader, writer):
        while await reader.read(CHUNK):
            pass
        writer.write(b"done")
        await writer.drain()
        writer.close()

    sink_srv = await asyncio.start_server(sink, "127.0.0.1", 0)
    sink_port = sink_srv.sockets[0].getsockname()[1]
    proxy = Proxy(f"127.0.0.1:{sink_port}", delay)
    srv, port = await proxy.serve()
    block = os.urandom(CHUNK)

    async def push(n_bytes):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        while sent < n_bytes:
            w.write(block)
            await w.drain()
            sent += len(block)
        w.write_eof()
        await r.read()
        w.close()

    results = {}
    for conns in (1, 4):
        t0 = time.monotonic()
        await asyncio.gather(*(push(mib * (1 << 20) // conns) for _ in range(conns)))
        results[conns] = mib * (1 << 20) / (time.monotonic() - t0) / 1e6
    srv.close()
    sink_srv.close()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--port-file")
    ap.add_argument("--log")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--mib", type=int, default=512)
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0
    if args.selftest:
        r = asyncio.run(selftest(delay, args.mib))
        print(f"latency proxy alone, {args.delay_ms:g} ms each way, {args.mib} MiB: "
              f"{r[1]:.0f} MB/s on 1 connection, {r[4]:.0f} MB/s on 4")
        return 0
    log = open(args.log, "a") if args.log else None

    async def run():
        proxy = Proxy(args.target, delay, log)
        server, port = await proxy.serve()
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
