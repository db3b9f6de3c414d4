#!/usr/bin/env python3
"""A latency-injecting TCP proxy for the benchmark (stdlib only; no kernel netem here).

Like toxiproxy's latency toxic: every chunk read from one side is written to the other side
`--delay-ms` after it was read, in order, in both directions, so a round trip through the proxy
costs twice the delay on top of the real one. Reading goes on while earlier chunks wait (a
bounded amount per direction: the bytes in flight of a long fat pipe), so the delay adds latency,
not a bandwidth cap of chunk/delay. TLS passes through untouched (the proxy sees only bytes).
An end of stream (half-close) is forwarded after the delay like data; an error on either side
aborts both.

    latency_proxy.py --target 127.0.0.1:5000 --delay-ms 25 --port-file F --log F
    latency_proxy.py --selftest [--delay-ms 25] [--mib 512]   # its own cost, no registry

The log gets one line `open <n>` per accepted connection (the benchmark counts them per run) and
`bytes <up> <down>` totals when a connection ends.

Cost: the proxy shares the benchmark machine's cores with the tools and registries, so it runs
on the event loop's raw readiness callbacks (no asyncio Streams, whose buffers copy every byte
twice more) and, on Linux, moves bytes with zero copy: a chunk is spliced from the socket into a
pipe and, when due, from the pipe into the other socket, never entering Python. Without splice
or a free pipe, a chunk is one `recv` and due chunks leave in one `sendmsg`. `--selftest` runs
the proxy as its own process and reports its throughput, CPU per GiB and echo round trips.
"""

import argparse
import asyncio
import collections
import errno
import fcntl
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# Largest single read; on loopback a wakeup usually finds less than this.
CHUNK = 1024 * 1024
# Bytes read but not yet written, per direction: 64 MiB covers 2.5 GB/s x 25 ms.
IN_FLIGHT = 64 * 1024 * 1024
# Reads per readiness wakeup before yielding to other connections (fairness).
READS_PER_WAKEUP = 16
# Buffers per sendmsg (well under IOV_MAX).
SEND_BATCH = 64
# Queue marker: the reading side failed; abort the connection when the marker is due.
ABORT = object()
# Splice: a pipe holds several chunks in order; as a pipe holds at most
# /proc/sys/fs/pipe-max-size, a direction fills a chain of them and recycles drained ones.
SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE else 0
PIPE_SIZE = 1024 * 1024
# Pipes per direction (2 fds each) and idle ones kept for reuse.
MAX_PIPES = 128
IDLE_PIPES = 2


class Pipe:
    """A kernel pipe holding spliced chunks; `fill` bytes are in it."""

    __slots__ = ("r", "w", "fill", "full")

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the per-user pipe allowance: the default size still works
            pass
        self.fill = 0
        self.full = False

    def close(self):
        os.close(self.r)
        os.close(self.w)


class Direction:
    """One direction of one connection: read, stamp, hold `delay`, write, in order."""

    def __init__(self, conn, src, dst, delay):
        self.conn, self.src, self.dst, self.delay = conn, src, dst, delay
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.loop = conn.loop
        # [due, payload, n]: payload is bytes/memoryview (n = its length), a Pipe (n bytes of it
        # are this chunk's), None (end of stream) or ABORT.
        self.queue = collections.deque()
        self.in_flight = 0
        self.bytes = 0
        self.reading = False  # reader callback registered
        self.read_eof = False
        self.blocked = False  # writer callback registered: dst's send buffer is full
        self.timer = None
        self.done = False  # end of stream forwarded
        self.splice = SPLICE
        self.tail = None  # the pipe reads go into
        self.pipes = 0  # pipes open: queued, tail and idle
        self.idle = []

    def start(self):
        self.loop.add_reader(self.src_fd, self.on_readable)
        self.reading = True

    def stop(self):
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.blocked:
            self.loop.remove_writer(self.dst_fd)
            self.blocked = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close_pipes(self):
        pipes = {id(p): p for p in self.idle}
        for item in self.queue:
            if isinstance(item[1], Pipe):
                pipes[id(item[1])] = item[1]
        if self.tail is not None:
            pipes[id(self.tail)] = self.tail
        for p in pipes.values():
            p.close()
        self.queue.clear()
        self.idle.clear()
        self.tail = None

    def tail_pipe(self):
        """The pipe to splice the next read into, or None to copy instead."""
        tail = self.tail
        if tail is not None and not tail.full:
            return tail
        if self.idle:
            tail = self.idle.pop()
        elif self.pipes >= MAX_PIPES:
            return None
        else:
            try:
                tail = Pipe()
            except OSError:
                return None
            self.pipes += 1
        self.tail = tail
        return tail

    def recycle(self, pipe):
        """A drained pipe that no read goes into any more: keep it idle or close it."""
        pipe.full = False
        if self.tail is pipe:
            self.tail = None
        if len(self.idle) < IDLE_PIPES:
            self.idle.append(pipe)
        else:
            pipe.close()
            self.pipes -= 1

    def on_readable(self):
        if self.conn.closed:
            return
        was_empty = not self.queue
        queue, time_ = self.queue, self.loop.time
        for _ in range(READS_PER_WAKEUP):
            pipe = self.tail_pipe() if self.splice else None
            try:
                if pipe is not None:
                    data = pipe
                    n = os.splice(self.src_fd, pipe.w, CHUNK, flags=SPLICE_FLAGS)
                else:
                    data = self.src.recv(CHUNK)
                    n = len(data)
            except (BlockingIOError, InterruptedError):
                if pipe is not None and pipe.fill:
                    # Readable, yet nothing moved: the pipe is full; go on in a fresh one.
                    pipe.full = True
                    continue
                break
            except OSError as e:
                if pipe is not None and e.errno in (errno.EINVAL, errno.ENOSYS):
                    self.splice = False  # no splice for this socket: copy
                    continue
                # Abort, after what was read before the error went out.
                queue.append([0.0, ABORT, 0])
                self.read_eof = True
                self.loop.remove_reader(self.src_fd)
                self.reading = False
                break
            # The delay runs from the moment the chunk was read.
            if not n:
                queue.append([time_() + self.delay, None, 0])
                self.read_eof = True
                self.loop.remove_reader(self.src_fd)
                self.reading = False
                break
            queue.append([time_() + self.delay, data, n])
            if pipe is not None:
                pipe.fill += n
            self.in_flight += n
            if self.in_flight >= IN_FLIGHT:
                self.loop.remove_reader(self.src_fd)
                self.reading = False
                break
            if n < CHUNK:  # most likely drained: spare the EAGAIN round
                break
        if was_empty and queue and not self.blocked and self.timer is None:
            self.timer = self.loop.call_at(queue[0][0], self.flush)

    def on_writable(self):
        if not self.conn.closed:
            self.flush()

    def flush(self):
        """Sends every chunk that is due, in order, as far as dst takes it."""
        self.timer = None
        if self.conn.closed:
            return
        queue, now = self.queue, self.loop.time()
        while queue and queue[0][0] <= now:
            head = queue[0][1]
            if head is ABORT:
                self.conn.abort()
                return
            if head is None:  # end of stream: half-close dst
                queue.popleft()
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    self.conn.abort()
                    return
                self.stop()
                self.done = True
                self.conn.direction_done()
                return
            try:
                if isinstance(head, Pipe):
                    # The due chunks at the front that sit in this pipe go in one splice.
                    offered = 0
                    for due, p, n in queue:
                        if due > now or p is not head:
                            break
                        offered += n
                    sent = os.splice(head.r, self.dst_fd, offered, flags=SPLICE_FLAGS)
                    head.fill -= sent
                else:
                    bufs = []
                    for due, data, _ in queue:
                        if due > now or not isinstance(data, (bytes, memoryview)) or \
                                len(bufs) == SEND_BATCH:
                            break
                        bufs.append(data)
                    offered = sum(map(len, bufs))
                    sent = self.dst.sendmsg(bufs) if len(bufs) > 1 else self.dst.send(bufs[0])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.conn.abort()
                return
            self.bytes += sent
            self.in_flight -= sent
            left = sent
            while left:
                item = queue[0]
                if left >= item[2]:
                    queue.popleft()
                    left -= item[2]
                else:
                    if not isinstance(item[1], Pipe):
                        item[1] = memoryview(item[1])[left:]
                    item[2] -= left
                    left = 0
            if isinstance(head, Pipe) and not head.fill and (head.full or head is not self.tail):
                self.recycle(head)
            if sent < offered:
                # dst took less than offered: wait until it can take more.
                if not self.blocked:
                    self.loop.add_writer(self.dst_fd, self.on_writable)
                    self.blocked = True
                break
        else:
            if self.blocked:
                self.loop.remove_writer(self.dst_fd)
                self.blocked = False
        if not self.reading and not self.read_eof and self.in_flight < IN_FLIGHT:
            self.loop.add_reader(self.src_fd, self.on_readable)
            self.reading = True
        if not self.blocked and queue and self.timer is None:
            self.timer = self.loop.call_at(queue[0][0], self.flush)


class Conn:
    """A client connection and its connection to the target; both closed together."""

    def __init__(self, loop, client, server, delay):
        self.loop, self.client, self.server = loop, client, server
        self.closed = False
        self.finished = loop.create_future()
        self.up = Direction(self, client, server, delay)
        self.down = Direction(self, server, client, delay)

    def start(self):
        self.up.start()
        self.down.start()

    def direction_done(self):
        if self.up.done and self.down.done:
            self.abort()  # nothing left to send either way: just close

    def abort(self):
        if self.closed:
            return
        self.closed = True
        for d in (self.up, self.down):
            d.stop()
            d.close_pipes()
        self.client.close()
        self.server.close()
        self.finished.set_result(None)


class Proxy:
    def __init__(self, target, delay, log=None):
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.delay = delay
        self.log = log
        self.opened = 0
        self.tasks = set()

    def note(self, line):
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def on_accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: pause accepting a moment instead of
                    # spinning on a listener that stays readable.
                    self.loop.remove_reader(self.listener.fileno())
                    self.loop.call_later(0.1, self.loop.add_reader, self.listener.fileno(),
                                         self.on_accept)
                return
            task = self.loop.create_task(self.handle(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle(self, client):
        self.opened += 1
        self.note(f"open {self.opened}")
        client.setblocking(False)
        try:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            client.close()
            return
        server.setblocking(False)
        try:
            await self.loop.sock_connect(server, (self.host, self.port))
        except OSError:
            server.close()
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(self.loop, client, server, self.delay)
        conn.start()
        await conn.finished
        self.note(f"bytes {conn.up.bytes} {conn.down.bytes}")

    async def serve(self, port=0):
        self.loop = asyncio.get_running_loop()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self.on_accept)
        return self.listener.getsockname()[1]

    def close(self):
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()


# --- selftest: the proxy as its own process between a sink/echo server and clients (threads
# with blocking sockets in this process, so the proxy's CPU is measured alone) ---

SELF = os.path.abspath(__file__)
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A stuck proxy fails the selftest instead of hanging the benchmark.
TIMEOUT = 60


def proc_cpu(pid):
    """user+system CPU seconds of a live child (None where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def recv_all(sock):
    out = bytearray()
    while True:
        b = sock.recv(1 << 16)
        if not b:
            return bytes(out)
        out += b


def target_server():
    """First byte `E`: echo until end of stream; else count bytes to the end, reply the count."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve(s):
        s.settimeout(TIMEOUT)
        with s:
            buf = bytearray(1 << 20)
            view, total = memoryview(buf), 0
            try:
                n = s.recv_into(buf)
                echo = n > 0 and buf[0] == ord("E")
                while n:
                    total += n
                    if echo:
                        s.sendall(view[:n])
                    n = s.recv_into(buf)
                if not echo:
                    s.sendall(str(total).encode())
            except OSError:  # the client side reports what went wrong
                pass

    def accept():
        while True:
            try:
                s, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(s,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lsock


def push(port, n_bytes, block, errors):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            view, sent = memoryview(block), 0
            while sent < n_bytes:
                k = min(len(block), n_bytes - sent)
                s.sendall(view[:k])
                sent += k
            s.shutdown(socket.SHUT_WR)  # the sink answers only after the forwarded EOF
            got = int(recv_all(s) or b"-1")
            if got != n_bytes:
                errors.append(f"sink got {got} of {n_bytes} bytes")
    except (OSError, ValueError) as e:
        errors.append(f"push: {e}")


def echo_check(port, rounds=10):
    """Round trips of 64 bytes on one connection, then 4 MiB echoed and compared (order)."""
    rtts = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds):
            msg = b"E" + os.urandom(63)
            t0 = time.monotonic()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                b = s.recv(64)
                if not b:
                    raise OSError("echo: early end of stream")
                got += b
            rtts.append(time.monotonic() - t0)
            if got != msg:
                raise OSError("echo: bytes differ")
        big = os.urandom(4 << 20)
        t = threading.Thread(target=s.sendall, args=(big,))
        t.start()
        got = bytearray()
        while len(got) < len(big):
            b = s.recv(1 << 20)
            if not b:
                break
            got += b
        t.join()
        if bytes(got) != big:
            raise OSError("echo: 4 MiB came back different (order or loss)")
        s.shutdown(socket.SHUT_WR)
        if recv_all(s):
            raise OSError("echo: bytes after the end")
    return rtts


def selftest(delay_ms, mib):
    """Runs the proxy as a child; returns MB/s and proxy CPU-s/GiB on 1 and 4 connections and
    echo round trips (ms)."""
    sink = target_server()
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen(
            [sys.executable, SELF, "--target", f"127.0.0.1:{sink.getsockname()[1]}",
             "--delay-ms", f"{delay_ms:g}", "--port-file", port_file], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(port_file):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise OSError("proxy did not start")
                time.sleep(0.01)
            with open(port_file) as f:
                port = int(f.read())
            rtts = echo_check(port)
            if min(rtts) < 2 * delay_ms / 1000:
                raise OSError(f"an echo came back in {min(rtts) * 1000:.1f} ms, under twice "
                              f"the delay: the delay is not applied")
            block = b"S" + os.urandom(CHUNK - 1)
            results = {}
            for conns in (1, 4):
                errors = []
                n = mib * (1 << 20) // conns
                threads = [threading.Thread(target=push, args=(port, n, block, errors))
                           for _ in range(conns)]
                cpu0, t0 = proc_cpu(proc.pid), time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall, cpu1 = time.monotonic() - t0, proc_cpu(proc.pid)
                if errors:
                    raise OSError("; ".join(errors))
                cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / (mib / 1024)
                results[conns] = (n * conns / wall / 1e6, cpu)
        finally:
            proc.terminate()
            proc.wait()
            sink.close()
    return results, [r * 1000 for r in rtts]


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
        try:
            r, rtts = selftest(args.delay_ms, args.mib)
        except OSError as e:
            print(f"latency proxy selftest FAILED: {e}")
            return 1
        cpu = [("?" if c is None else f"{c:.2f}") for _, c in (r[1], r[4])]
        print(f"latency proxy alone, {args.delay_ms:g} ms each way, {args.mib} MiB: "
              f"{r[1][0]:.0f} MB/s on 1 connection, {r[4][0]:.0f} MB/s on 4; "
              f"proxy CPU {cpu[0]} / {cpu[1]} s per GiB; echo round trip "
              f"min {min(rtts):.1f} median {statistics.median(rtts):.1f} max {max(rtts):.1f} ms "
              f"(floor {2 * args.delay_ms:g})")
        return 0
    log = open(args.log, "a") if args.log else None
    try:  # pipes cost descriptors: allow as many as the hard limit does
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass

    async def run():
        proxy = Proxy(args.target, delay, log)
        port = await proxy.serve()
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        proxy.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
