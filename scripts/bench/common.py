"""Shared by the benchmark's modules: media types, logging, a small HTTP client, and the
registries (start, stop, CPU time, access-log counts)."""

import functools
import hashlib
import json
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
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

# Set by bench.py before any registry starts: {"ca": path, "cert": path, "key": path,
# "cert_dir": dir holding ca.crt (skopeo's --*-cert-dir)} when the registries serve HTTPS.
TLS = {}
MIB = 1024 * 1024
CHUNK = 1 << 20


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def write_mirror_yaml(path, scenario, src, destination, extra=""):
    """One ImageMirror document per source repository of `scenario` into `path`: the source
    through `src.front` (plain HTTP unless TLS), `destination(repo)` giving the destination's
    fields (repository, and plainHTTP for a registry), `extra` appended to every spec."""
    plain = "false" if TLS else "true"
    docs = []
    for repo, tags in scenario.repos.items():
        name = re.sub(r"[^a-z0-9-]", "-", repo.lower())
        names = ", ".join(json.dumps(t) for t in tags)
        dest = "".join(f"    {k}: {v}\n" for k, v in destination(repo).items())
        docs.append(f"""apiVersion: imagemirror.dev/v1alpha1
kind: ImageMirror
metadata:
  name: {name}
  namespace: bench
spec:
  source:
    repository: {src.front}/{repo}
    plainHTTP: {plain}
  destination:
{dest}  tags:
    names: [{names}]
{extra}""")
    with open(path, "w") as f:
        f.write("---\n".join(docs))


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
                if TLS:
                    ctx = ssl.create_default_context(cafile=TLS["ca"])
                    self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=600,
                                                            context=ctx)
                else:
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
# TLS and latency


def make_ca(work):
    """A private CA and a server certificate for 127.0.0.1 signed by it (openssl, EC P-256, as
    the registries the issue measures serve); fills TLS."""
    d = os.path.join(work, "tls")
    os.makedirs(os.path.join(d, "certs"), exist_ok=True)
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    cert, key, csr = (os.path.join(d, n) for n in ("server.pem", "server.key", "server.csr"))
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=imagemirror bench CA"],
        ["openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(cmd[:3])}: {r.stderr.strip()[-500:]}")
    shutil.copy(ca, os.path.join(d, "certs", "ca.crt"))
    for root, dirs, files in os.walk(d):
        os.chmod(root, 0o755)
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)  # skopeo runs as nobody
    TLS.update(ca=ca, cert=cert, key=key, cert_dir=os.path.join(d, "certs"))


def skopeo_tls_flags(src=True, dest=True):
    """skopeo's flags for the registries' TLS: the private CA, or no TLS at all."""
    flags = []
    for side, on in (("src", src), ("dest", dest)):
        if on:
            flags += ([f"--{side}-cert-dir={TLS['cert_dir']}"] if TLS else [f"--{side}-tls-verify=false"])
    return flags


class LatencyProxy:
    """latency_proxy.py in front of a registry: tools reach the registry through `addr`."""

    def __init__(self, registry, delay_ms, pidfile):
        self.registry, self.delay_ms = registry, delay_ms
        self.log_path = os.path.join(registry.dir, f"proxy-{delay_ms:g}ms.log")
        port_file = self.log_path + ".port"
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(here, "latency_proxy.py"), "--target", registry.addr,
             "--delay-ms", str(delay_ms), "--port-file", port_file, "--log", self.log_path],
            stdin=subprocess.DEVNULL)
        with open(pidfile, "a") as f:
            f.write(f"{self.proc.pid}\n")
        deadline = time.monotonic() + 15
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"latency proxy for {registry.name} did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            self.addr = f"127.0.0.1:{int(f.read())}"

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


STRACE_CONNECT = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-e", "signal=none"]


@functools.cache
def strace_works():
    """Whether strace can trace here; where ptrace is not allowed (some containers), tools run
    untraced and connections show "-". Probed once, on first use (not when imported)."""
    try:
        return subprocess.run(STRACE_CONNECT + ["-o", os.devnull, "true"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def traced(cmd, trace_file):
    """`cmd` under strace, recording only its connect() calls into `trace_file`. With
    --seccomp-bpf the kernel stops the tool only at connect() (and thread creation), so the
    tool runs at full speed; the count is exact, where sampling /proc/net/tcp every 10 ms
    missed short connections and cost a third of a core in this Python process (it showed up
    as "other" CPU competing with the tools)."""
    return STRACE_CONNECT + ["-o", trace_file] + cmd if strace_works() else cmd


def count_connects(trace_file, ports):
    """TCP connections the traced tool opened to each of `ports`: connect() calls to 127.0.0.1
    on that port that did not fail outright (non-blocking sockets answer EINPROGRESS)."""
    if not strace_works():
        return {}
    counts = {p: 0 for p in ports}
    pat = re.compile(r"connect\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\)")
    try:
        with open(trace_file, errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if not m or int(m.group(1)) not in counts:
                    continue
                failed = re.search(r"= -1 (E[A-Z]+)", line)
                if failed and failed.group(1) != "EINPROGRESS":
                    continue
                counts[int(m.group(1))] += 1
    except OSError:
        pass
    return counts


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


ACCESS_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) ([^"]*)" (\d{3}) (\d+|-)')


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
        self.proxy = None  # a LatencyProxy the tools go through, if any

    @property
    def front(self):
        """The address the tools are given: the latency proxy's, or the registry's own."""
        return self.proxy.addr if self.proxy else self.addr

    def add_latency(self, delay_ms):
        if delay_ms > 0:
            self.proxy = LatencyProxy(self, delay_ms, self.pidfile)
        return self

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
                if TLS:
                    f.write(f"  tls:\n    certificate: {TLS['cert']}\n    key: {TLS['key']}\n")
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
        if self.proxy is not None:
            self.proxy.stop()
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
        methods, blob_get_bytes, statuses, protos = {}, 0, {}, {}
        for line in text.splitlines():
            m = ACCESS_RE.match(line)
            if not m:
                continue
            method, path, proto, status, size = m.groups()
            methods[method] = methods.get(method, 0) + 1
            protos[proto] = protos.get(proto, 0) + 1
            statuses[status] = statuses.get(status, 0) + 1
            if method == "GET" and "/blobs/sha256:" in path and size != "-":
                blob_get_bytes += int(size)
        return {"methods": methods, "statuses": statuses, "blob_get_bytes": blob_get_bytes,
                "total": sum(methods.values()), "protocols": protos}
