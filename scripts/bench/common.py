"""Shared by the benchmark's modules: media types, logging, a small HTTP client, and the
registries (start, stop, CPU time, access-log counts)."""

import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL_MANIFEST_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
ACCEPT = ", ".join(ALL_MANIFEST_TYPES)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

FLAVOR = {
    # flavor: (manifest, index, config, layer) media types
    "oci": (OCI_MANIFEST, OCI_INDEX, "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip"),
    "docker": (DOCKER_MANIFEST, DOCKER_LIST, "application/vnd.docker.container.image.v1+json",
               "application/vnd.docker.image.rootfs.diff.tar.gzip"),
}

DEST_PREFIX = "mirror"


def dest_repo(repo):
    """Where both tools put a source repository: skopeo sync (without --scoped) keeps only the
    last path component under the destination prefix, so imagemirror is pointed at the same."""
    return f"{DEST_PREFIX}/{repo.rsplit('/', 1)[-1]}"
TOOLS = ("imagemirror", "skopeo")
MIB = 1024 * 1024
CHUNK = 1 << 20


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# HTTP


class Http:
    """A keep-alive HTTP/1.1 client for one registry."""

    def __init__(self, addr):
        self.addr = addr
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        headers = dict(headers or {})
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, resp.headers, data
            except (http.client.HTTPException, ConnectionError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt or not (body is None or isinstance(body, bytes)):
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def location_path(loc):
    u = urllib.parse.urlsplit(loc)
    return u.path + ("?" + u.query if u.query else "")


def add_query(path, extra):
    return path + ("&" if "?" in path else "?") + extra


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Registries


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid):
    """user+system CPU seconds of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds():
    """CPU seconds the whole machine spent not idle, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


ACCESS_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


def settle(*registries):
    """Waits until the registries' access logs stop growing (a line is written when its handler
    returns, which can be a moment after the client has its response) and returns their sizes."""
    last, stable_since = None, time.monotonic()
    while True:
        sizes = [r.log_offset() for r in registries]
        now = time.monotonic()
        if sizes != last:
            last, stable_since = sizes, now
        elif now - stable_since >= 0.2:
            return sizes
        time.sleep(0.05)


class Registry:
    registries = []

    def __init__(self, work, name, pidfile):
        self.name = name
        self.dir = os.path.join(work, "registries", name)
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.data, exist_ok=True)
        self.access_log = os.path.join(self.dir, "access.log")
        self.error_log = os.path.join(self.dir, "registry.log")
        self.proc = None
        self.pidfile = pidfile
        self.addr = None

    def start(self):
        for _ in range(5):
            port = free_port()
            self.addr = f"127.0.0.1:{port}"
            cfg = os.path.join(self.dir, "config.yml")
            with open(cfg, "w") as f:
                f.write(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {self.data}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.addr}
  secret: imagemirror-bench
""")
            out = open(self.access_log, "ab")
            err = open(self.error_log, "ab")
            self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
            out.close()
            err.close()
            with open(self.pidfile, "a") as f:
                f.write(f"{self.proc.pid}\n")
            Registry.registries.append(self)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    st, _, _ = Http(self.addr).request("GET", "/v2/")
                    if st == 200:
                        self.http = Http(self.addr)
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            self.stop()  # port race or slow start: try another port
        raise BenchError(f"registry {self.name} did not start; see {self.error_log}")

    def stop(self, remove=False):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "http"):
            self.http.close()
        if remove:
            shutil.rmtree(self.data, ignore_errors=True)

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def log_offset(self):
        return os.path.getsize(self.access_log)

    def requests_between(self, start, end):
        """Counts of requests by method, and bytes served by GET .../blobs/..., in a log range."""
        with open(self.access_log, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode("utf-8", "replace")
        methods, blob_get_bytes, statuses = {}, 0, {}
        for line in text.splitlines():
            m = ACCESS_RE.match(line)
            if not m:
                continue
            method, path, status, size = m.group(1), m.group(2), m.group(3), m.group(4)
            methods[method] = methods.get(method, 0) + 1
            statuses[status] = statuses.get(status, 0) + 1
            if method == "GET" and "/blobs/sha256:" in path and size != "-":
                blob_get_bytes += int(size)
        return {"methods": methods, "statuses": statuses, "blob_get_bytes": blob_get_bytes,
                "total": sum(methods.values())}
