#!/usr/bin/env python3
"""imagemirror vs skopeo sync, on the same synthetic data, between local registries.

Called by scripts/bench.sh (which builds the binary and cleans up); stdlib only.

What it does:
  * starts a source registry (CNCF distribution) and seeds it through the registry HTTP API with a
    deterministic data set (PRNG bytes wrapped in gzip framing, streamed, never held in memory);
  * per scenario and run, starts a FRESH destination registry (new storage dir, new port) for cold
    runs, runs imagemirror and skopeo alternately under /usr/bin/time -v, counts the requests each
    registry served during the run from its access log, reads the CPU time each registry used from
    /proc, and verifies that every destination manifest (tags, index children) is byte-identical to
    the source and every blob is present with the right size -- it stops with an error otherwise;
  * writes a markdown report (and the raw numbers as JSON) into --out and prints it.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import zlib

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


# ----------------------------------------------------------------------------------------------
# The data set


class Blob:
    """A deterministic layer: PRNG bytes (seeded by name) in gzip framing (stored blocks)."""

    def __init__(self, name, size):
        self.name = name
        self.size_raw = max(int(size), 64)
        self.digest = None
        self.size = None

    def chunks(self):
        seed = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        comp = zlib.compressobj(0, zlib.DEFLATED, 31)
        left = self.size_raw
        while left > 0:
            n = min(CHUNK, left)
            left -= n
            out = comp.compress(rng.randbytes(n))
            if out:
                yield out
        yield comp.flush()


class Seeder:
    """Pushes images to the source registry through the distribution API."""

    def __init__(self, registry):
        self.reg = registry
        self.http = Http(registry.addr)
        self.where = {}  # digest -> a repository that has it
        self.pushed_bytes = 0

    def _check(self, st, body, what, ok=(201, 202)):
        if st not in ok:
            raise BenchError(f"seeding: {what}: HTTP {st}: {body[:300]!r}")

    def blob_bytes(self, repo, data):
        digest = sha256_digest(data)
        self._put_blob(repo, digest, data)
        return digest, len(data)

    def blob(self, repo, blob):
        self._put_blob(repo, blob.digest, blob)
        return blob.digest, blob.size

    def _put_blob(self, repo, digest, content):
        """Monolithic PUT for bytes; for a Blob, one streamed PATCH (hashed on the way, chunked
        transfer encoding) closed by PUT ?digest=. Known digests are mounted from another repo."""
        repos = self.where.get(digest) if digest else None
        if repos and repo in repos:
            return
        if repos:
            frm = sorted(repos)[0]
            st, h, body = self.http.request(
                "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={frm}",
                headers={"Content-Length": "0"})
            if st == 201:
                repos.add(repo)
                return
            self._check(st, body, f"mount {digest}", ok=(202,))
        else:
            st, h, body = self.http.request("POST", f"/v2/{repo}/blobs/uploads/",
                                            headers={"Content-Length": "0"})
            self._check(st, body, f"start upload in {repo}", ok=(202,))
        loc = location_path(h["Location"])
        if isinstance(content, bytes):
            size = len(content)
            st, h, body = self.http.request(
                "PUT", add_query(loc, "digest=" + digest), body=content,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        else:
            hasher, count = hashlib.sha256(), [0]

            def hashed():
                for c in content.chunks():
                    hasher.update(c)
                    count[0] += len(c)
                    yield c

            st, h, body = self.http.request("PATCH", loc, body=hashed(),
                                            headers={"Content-Type": "application/octet-stream"})
            self._check(st, body, f"PATCH {content.name}", ok=(202,))
            digest, size = "sha256:" + hasher.hexdigest(), count[0]
            if content.digest not in (None, digest):
                raise BenchError(f"blob {content.name} is not deterministic")
            content.digest, content.size = digest, size
            st, h, body = self.http.request(
                "PUT", add_query(location_path(h["Location"]), "digest=" + digest),
                headers={"Content-Length": "0"})
        self._check(st, body, f"PUT blob {digest} into {repo}", ok=(201,))
        self.pushed_bytes += size
        self.where.setdefault(digest, set()).add(repo)

    def manifest(self, repo, ref, mt, data):
        st, h, body = self.http.request("PUT", f"/v2/{repo}/manifests/{ref}", body=data,
                                        headers={"Content-Type": mt})
        self._check(st, body, f"PUT manifest {repo}:{ref}", ok=(201,))
        return h.get("Docker-Content-Digest") or sha256_digest(data)

    def image(self, repo, flavor, arch, layers, label):
        mt, _, cmt, lmt = FLAVOR[flavor]
        layer_descs = []
        for b in layers:
            d, s = self.blob(repo, b)
            layer_descs.append({"mediaType": lmt, "digest": d, "size": s})
        config = json.dumps({
            "architecture": arch, "os": "linux",
            "config": {"Labels": {"bench": label}},
            "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layer_descs]},
            "history": [{"created_by": f"bench layer {b.name}"} for b in layers],
        }, sort_keys=True).encode()
        cd, cs = self.blob_bytes(repo, config)
        man = {"schemaVersion": 2, "mediaType": mt,
               "config": {"mediaType": cmt, "digest": cd, "size": cs}, "layers": layer_descs}
        return mt, json.dumps(man, indent=3).encode()

    def push_tag(self, repo, tag, spec):
        """spec: ("image", flavor, arch, layers) or ("index", flavor, [(arch, layers), ...])."""
        kind, flavor = spec[0], spec[1]
        if kind == "image":
            mt, data = self.image(repo, flavor, spec[2], spec[3], f"{repo}:{tag}")
            return self.manifest(repo, tag, mt, data)
        _, imt, _, _ = FLAVOR[flavor]
        children = []
        for arch, layers in spec[2]:
            mt, data = self.image(repo, flavor, arch, layers, f"{repo}:{tag}/{arch}")
            d = self.manifest(repo, sha256_digest(data), mt, data)
            variant = {"arm64": "v8"}.get(arch)
            platform = {"architecture": arch, "os": "linux"}
            if variant:
                platform["variant"] = variant
            children.append({"mediaType": mt, "digest": d, "size": len(data), "platform": platform})
        index = json.dumps({"schemaVersion": 2, "mediaType": imt, "manifests": children},
                           indent=3).encode()
        return self.manifest(repo, tag, imt, index)


class Scenario:
    def __init__(self, name, title):
        self.name = name
        self.title = title
        self.repos = {}  # repo -> {tag: spec or ("alias", tag)}

    def add(self, repo, tag, spec):
        self.repos.setdefault(repo, {})[tag] = spec

    def add_check(self):
        last = [dest_repo(r) for r in self.repos]
        assert len(set(last)) == len(last), f"{self.name}: destination names collide"

    def tags(self):
        return [(r, t) for r, ts in self.repos.items() for t in ts]


def build_scenarios(quick):
    """The data sets. Sizes are in MiB at full scale; --quick turns each MiB into 4 KiB."""
    unit = 4096 if quick else MIB

    def B(name, mib):
        return Blob(name, mib * unit)

    debian = {a: B(f"base-debian-{a}", 100) for a in ("amd64", "arm64")}
    alpine = {a: B(f"base-alpine-{a}", 8) for a in ("amd64", "arm64")}
    python = {a: B(f"runtime-python-{a}", 60) for a in ("amd64", "arm64")}
    node = {a: B(f"runtime-node-{a}", 45) for a in ("amd64", "arm64")}
    jdk = B("runtime-jdk-amd64", 140)
    model = B("ml-model-weights", 300)

    std = Scenario("standard", "10 repositories, 30 tags, shared bases, indexes, OCI + Docker")

    def versions(repo, flavor, n, layers_for, multi, app_mib, latest=True):
        """n versions of an app; 'latest' aliases the newest one."""
        for i in range(n):
            tag = f"1.{i}"
            if multi:
                spec = ("index", flavor,
                        [(a, layers_for(a) + [B(f"{repo}-{tag}-{a}", app_mib)]) for a in ("amd64", "arm64")])
            else:
                spec = ("image", flavor, "amd64", layers_for("amd64") + [B(f"{repo}-{tag}", app_mib)])
            std.add(repo, tag, spec)
        if latest:
            std.add(repo, "latest", ("alias", f"1.{n - 1}"))

    versions("std/debian", "oci", 2, lambda a: [debian[a]], True, 6)               # 3 tags, OCI index
    versions("std/alpine", "docker", 2, lambda a: [alpine[a]], True, 2)            # 3 tags, manifest list
    versions("std/python", "oci", 3, lambda a: [debian[a], python[a]], True, 20)   # 4 tags
    versions("std/node", "docker", 2, lambda a: [debian[a], node[a]], True, 20)    # 3 tags
    versions("std/jdk", "docker", 2, lambda a: [debian[a], jdk], False, 40)        # 3 tags
    versions("std/web", "oci", 3, lambda a: [alpine[a]], False, 25)                # 3 tags
    versions("std/api", "docker", 3, lambda a: [debian[a], python[a]], False, 40, latest=False)
    versions("std/worker", "oci", 3, lambda a: [debian[a], python[a]], False, 40, latest=False)
    std.add("std/ml", "2024.1", ("image", "oci", "amd64", [debian["amd64"], python["amd64"], model]))
    std.add("std/ml", "latest", ("alias", "2024.1"))
    versions("std/tools", "docker", 2, lambda a: [alpine[a], B(f"tools-bin-{a}", 12)], True, 3)

    many = Scenario("many", "small tags: per-request overhead")
    small_base = B("many-base", 2)
    per_repo = 10 if quick else 50
    for r in range(4):
        repo = f"many/svc{r}"
        flavor = "oci" if r % 2 == 0 else "docker"
        for i in range(per_repo):
            many.add(repo, f"v{i}", ("image", flavor, "amd64",
                                     [small_base, Blob(f"many-{r}-{i}", 0.1 * unit)]))

    shared = Scenario("shared", "20 mirrors sharing base layers, one process")
    for i in range(20):
        flavor = "oci" if i % 2 == 0 else "docker"
        shared.add(f"shared/svc{i:02d}", "1.0",
                   ("image", flavor, "amd64", [debian["amd64"], python["amd64"], B(f"shared-app-{i}", 4)]))

    for s in (std, many, shared):
        s.add_check()
    return {"standard": std, "many": many, "shared": shared}


def seed(seeder, scenario):
    for repo, tags in scenario.repos.items():
        digests = {}
        for tag, spec in tags.items():
            if spec[0] == "alias":
                continue
            digests[tag] = seeder.push_tag(repo, tag, spec)
        for tag, spec in tags.items():
            if spec[0] == "alias":
                st, h, body = seeder.http.request("GET", f"/v2/{repo}/manifests/{spec[1]}",
                                                  headers={"Accept": ACCEPT})
                seeder._check(st, body, f"GET {repo}:{spec[1]}", ok=(200,))
                seeder.manifest(repo, tag, h["Content-Type"], body)


# ----------------------------------------------------------------------------------------------
# Walking and verifying


def get_manifest(httpc, repo, ref):
    st, h, body = httpc.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
    return st, (h.get("Content-Type") or "").split(";")[0].strip(), body


def walk_source(src, scenario):
    """Everything a scenario holds on the source: {(repo, ref): (mediatype, bytes)}, blobs."""
    manifests, blobs = {}, {}
    for repo, tag in scenario.tags():
        st, ct, body = get_manifest(src.http, repo, tag)
        if st != 200:
            raise BenchError(f"source {repo}:{tag}: HTTP {st}")
        todo = [(tag, ct, body)]
        while todo:
            ref, ct, body = todo.pop()
            manifests[(repo, ref)] = (ct, body)
            doc = json.loads(body)
            if ct in INDEX_TYPES:
                for child in doc["manifests"]:
                    if (repo, child["digest"]) not in manifests:
                        st, cct, cbody = get_manifest(src.http, repo, child["digest"])
                        if st != 200:
                            raise BenchError(f"source {repo}@{child['digest']}: HTTP {st}")
                        todo.append((child["digest"], cct, cbody))
            else:
                for d in [doc["config"]] + doc["layers"]:
                    blobs.setdefault(d["digest"], {"size": d["size"], "repos": set()})["repos"].add(repo)
    return manifests, blobs


def verify(dst, source_view, tool):
    """Every source manifest is byte-identical at the destination, every blob is there."""
    manifests, blobs = source_view
    errors = []
    for (repo, ref), (ct, body) in manifests.items():
        drepo = dest_repo(repo)
        st, dct, dbody = get_manifest(dst.http, drepo, ref)
        if st != 200:
            errors.append(f"{drepo}:{ref}: HTTP {st} (missing)")
        elif dbody != body:
            errors.append(f"{drepo}:{ref}: manifest differs: source {sha256_digest(body)} "
                          f"({len(body)} bytes), destination {sha256_digest(dbody)} ({len(dbody)} bytes)")
        elif dct != ct:
            errors.append(f"{drepo}:{ref}: media type {dct!r}, source has {ct!r}")
    for digest, info in blobs.items():
        for repo in sorted(info["repos"]):
            st, h, _ = dst.http.request("HEAD", f"/v2/{dest_repo(repo)}/blobs/{digest}")
            if st != 200:
                errors.append(f"{dest_repo(repo)} blob {digest}: HTTP {st}")
            elif int(h.get("Content-Length", -1)) != info["size"]:
                errors.append(f"{dest_repo(repo)} blob {digest}: size {h.get('Content-Length')}, "
                              f"expected {info['size']}")
    if errors:
        shown = "\n    ".join(errors[:20])
        more = f"\n    ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        return (f"VERIFICATION FAILED after {tool}: {len(errors)} problem(s) at "
                f"{dst.addr}:\n    {shown}{more}")
    return None


# ----------------------------------------------------------------------------------------------
# Running the tools


def parse_time_v(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Elapsed (wall clock) time"):
                v = line.rsplit(": ", 1)[1]
                parts = [float(p) for p in v.split(":")]
                secs = 0.0
                for p in parts:
                    secs = secs * 60 + p
                out["wall"] = secs
            elif line.startswith("Maximum resident set size"):
                out["rss_kb"] = int(line.rsplit(": ", 1)[1])
            elif line.startswith("User time"):
                out["user"] = float(line.rsplit(": ", 1)[1])
            elif line.startswith("System time"):
                out["sys"] = float(line.rsplit(": ", 1)[1])
            elif line.startswith("Exit status"):
                out["exit"] = int(line.rsplit(": ", 1)[1])
    return out


def write_imagemirror_yaml(path, scenario, src, dst):
    docs = []
    for repo, tags in scenario.repos.items():
        name = re.sub(r"[^a-z0-9-]", "-", repo.lower())
        names = ", ".join(json.dumps(t) for t in tags)
        docs.append(f"""apiVersion: imagemirror.dev/v1alpha1
kind: ImageMirror
metadata:
  name: {name}
  namespace: bench
spec:
  source:
    repository: {src.addr}/{repo}
    plainHTTP: true
  destination:
    repository: {dst.addr}/{dest_repo(repo)}
    plainHTTP: true
  tags:
    names: [{names}]
""")
    with open(path, "w") as f:
        f.write("---\n".join(docs))


def write_skopeo_yaml(path, scenario, src):
    lines = [f"{src.addr}:", "  tls-verify: false", "  images:"]
    for repo, tags in scenario.repos.items():
        lines.append(f"    {repo}: [{', '.join(json.dumps(t) for t in tags)}]")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class Runner:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.pidfile = os.path.join(self.work, "pids")
        self.n_reg = 0
        os.makedirs(os.path.join(self.work, "runs"), exist_ok=True)
        with open(os.path.join(self.work, "policy.json"), "w") as f:
            f.write('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        # skopeo keeps a blob-location cache on disk (/var/lib/containers/cache for root) that
        # survives runs and would let it "remember" earlier destinations. Give each skopeo run a
        # cache of its own: as root, drop to nobody (rootless skopeo keeps it under $XDG_DATA_HOME).
        self.skopeo_as_nobody = os.geteuid() == 0 and shutil.which("setpriv") is not None
        if self.skopeo_as_nobody:
            os.chmod(self.work, 0o755)

    def new_registry(self, label):
        self.n_reg += 1
        return Registry(self.work, f"{self.n_reg:03d}-{label}", self.pidfile).start()

    def run_tool(self, tool, scenario, src, dst, tag):
        rdir = os.path.join(self.work, "runs", tag)
        os.makedirs(rdir, exist_ok=True)
        if self.skopeo_as_nobody:
            os.chmod(rdir, 0o777)
        timef = os.path.join(rdir, "time.txt")
        outf = os.path.join(rdir, "output.log")
        env = dict(os.environ)
        if tool == "imagemirror":
            yaml = os.path.join(rdir, "mirrors.yaml")
            write_imagemirror_yaml(yaml, scenario, src, dst)
            cmd = [self.args.bin, "mirror", "-f", yaml] + self.args.im_arg
            env.setdefault("IMAGEMIRROR_LOG_LEVEL", "warn")
            env["DOCKER_CONFIG"] = rdir  # no credentials file: anonymous
        else:
            yaml = os.path.join(rdir, "skopeo.yaml")
            write_skopeo_yaml(yaml, scenario, src)
            home = os.path.join(rdir, "home")
            os.makedirs(home)
            env.update(HOME=home, XDG_DATA_HOME=os.path.join(home, "data"),
                       XDG_RUNTIME_DIR=home, XDG_CONFIG_HOME=os.path.join(home, "config"))
            cmd = ["skopeo", "--policy", os.path.join(self.work, "policy.json"),
                   "--tmpdir", home,
                   "sync", "--src", "yaml", "--dest", "docker", "--all", "--preserve-digests",
                   "--src-tls-verify=false", "--dest-tls-verify=false",
                   yaml, f"{dst.addr}/{DEST_PREFIX}"]
            if self.skopeo_as_nobody:
                os.chmod(home, 0o777)
                cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        os.chmod(yaml, 0o644)
        full = ["/usr/bin/time", "-v", "-o", timef] + cmd
        # Write back what earlier runs left dirty (and the removed registries' trees), so a run
        # does not pay for its predecessor's disk writes.
        os.sync()
        src_off, dst_off = src.log_offset(), dst.log_offset()
        cpu0 = (src.cpu(), dst.cpu(), machine_busy_seconds())
        t0 = time.monotonic()
        with open(outf, "wb") as out:
            rc = subprocess.call(full, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        src_end, dst_end = settle(src, dst)
        cpu1 = (src.cpu(), dst.cpu(), machine_busy_seconds())
        failure = None
        if rc != 0:
            with open(outf, errors="replace") as f:
                text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
            # the lines that say what failed (imagemirror's summary rows, skopeo's errors)
            bad = [l for l in text.splitlines()
                   if re.search(r"Failed|level=(error|fatal)|[Ee]rror", l)][:10]
            failure = f"{tool} exited {rc}; see {outf}:\n    " + "\n    ".join(bad or text[-1500:].splitlines())
        t = parse_time_v(timef)
        tool_cpu = t.get("user", 0) + t.get("sys", 0)
        busy = cpu1[2] - cpu0[2]
        return {
            "failure": failure,
            "wall": t.get("wall", elapsed),
            "rss_kb": t.get("rss_kb", 0),
            "cpu_tool": tool_cpu,
            "cpu_src": cpu1[0] - cpu0[0],
            "cpu_dst": cpu1[1] - cpu0[1],
            "cpu_other": max(0.0, busy - tool_cpu - (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])),
            "src": src.requests_between(src_off, src_end),
            "dst": dst.requests_between(dst_off, dst_end),
        }


# ----------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n):
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"


def fmt_methods(runs, side):
    keys = sorted({m for r in runs for m in r[side]["methods"]},
                  key=lambda m: ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"].index(m)
                  if m in ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"] else 99)
    parts = []
    for k in keys:
        vals = [r[side]["methods"].get(k, 0) for r in runs]
        med = statistics.median(vals)
        parts.append(f"{k} {med:g}")
    total = statistics.median([r[side]["total"] for r in runs])
    return f"{total:g} ({', '.join(parts)})" if parts else "0"


def report(results, unique, meta, failures):
    lines = []
    lines.append(f"# imagemirror vs skopeo sync — {meta['date']}")
    lines.append("")
    if failures:
        lines.append(f"**FAILED: {len(failures)} run(s) failed** (see Failures below; failed runs "
                     "are left out of the medians).")
        lines.append("")
    lines.append(f"Command: `{meta['command']}`  ")
    flags = " ".join(meta["im_args"]) or "default flags"
    lines.append(f"imagemirror {meta['imagemirror_version']} ({flags}); {meta['skopeo_version']} (`sync --all --preserve-digests`); "
                 f"{meta['registry_version']}; {meta['cpus']} CPUs, load average at start "
                 f"{meta['load']}; runs per tool: {meta['runs']}.")
    lines.append("")
    lines.append("| scenario | tool | wall (median) | im/skopeo | peak RSS | source requests | "
                 "destination requests | bytes read from source / unique | CPU s: tool / src reg / dst reg / other |")
    lines.append("|---|---|---:|---:|---:|---|---|---|---|")
    for scen in results:
        med = {}
        for tool in TOOLS:
            ok = [r for r in results[scen].get(tool, []) if not r["failure"]]
            if ok:
                med[tool] = statistics.median(r["wall"] for r in ok)
        for tool in TOOLS:
            all_runs = results[scen].get(tool, [])
            runs = [r for r in all_runs if not r["failure"]]
            walls = ", ".join(f"{r['wall']:.2f}" if not r["failure"] else "FAILED" for r in all_runs)
            if not runs:
                if all_runs:
                    lines.append(f"| {scen} | {tool} | all runs FAILED ({walls}) | | | | | | |")
                continue
            ratio = ""
            if tool == "imagemirror" and "skopeo" in med and med["skopeo"] > 0:
                ratio = f"{med['imagemirror'] / med['skopeo']:.2f}×"
            rss = statistics.median(r["rss_kb"] for r in runs) / 1024
            read = statistics.median(r["src"]["blob_get_bytes"] for r in runs)
            u = unique[scen]
            rel = f"{read / u:.2f}×" if u else "-"
            cpu = " / ".join(f"{statistics.median(r[k] for r in runs):.1f}"
                             for k in ("cpu_tool", "cpu_src", "cpu_dst", "cpu_other"))
            lines.append(f"| {scen} | {tool} | {med[tool]:.2f} s ({walls}) | {ratio} | {rss:.0f} MiB | "
                         f"{fmt_methods(runs, 'src')} | {fmt_methods(runs, 'dst')} | "
                         f"{fmt_bytes(read)} / {fmt_bytes(u)} = {rel} | {cpu} |")
    lines.append("")
    lines.append("Wall: median of the runs (each run in parentheses), from `/usr/bin/time -v`; "
                 "im/skopeo: ratio of the medians (below 1 means imagemirror is faster). "
                 "Requests: counted in each registry's access log during the run, median per method. "
                 "Bytes read: sum of the response sizes of `GET …/blobs/…` on the source; unique: the "
                 "sum of the sizes of the distinct blobs the scenario references (1.00× means every "
                 "byte was read once). CPU: user+system seconds of the tool and of each registry "
                 "process during the run, and of everything else on the machine (other users' builds: "
                 "a high number means the run competed for the CPUs). Cold scenarios copy into a fresh registry every run; warm "
                 "re-runs standard against a destination that already has everything. Every run is "
                 "verified: all manifests byte-identical to the source, every blob present.")
    lines.append("")
    if failures:
        lines.append("## Failures")
        lines.append("")
        lines.append("```")
        lines.extend(failures)
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scenario", action="append", default=[])
    ap.add_argument("--command", default="scripts/bench.sh")
    ap.add_argument("--keep-dest", action="store_true", help="keep destination registry data")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    ap.add_argument("--im-arg", action="append", default=[], help="extra `imagemirror mirror` argument")
    args = ap.parse_args()

    order = ["standard", "warm", "many", "shared"]
    wanted = []
    for s in args.scenario or ["all"]:
        for part in s.split(","):
            part = part.strip()
            if part == "all":
                wanted += order
            elif part in order:
                wanted.append(part)
            else:
                raise SystemExit(f"bench: unknown scenario {part!r} (one of: {', '.join(order)}, all)")
    wanted = [s for s in order if s in wanted]
    os.makedirs(args.out, exist_ok=True)

    scenarios = build_scenarios(args.quick)
    scenarios["warm"] = scenarios["standard"]
    runner = Runner(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(args, runner, scenarios, wanted)
    except BenchError as e:
        log(str(e))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for r in Registry.registries:
            r.stop()


def run(args, runner, scenarios, wanted):
    src = runner.new_registry("source")
    log(f"source registry {src.addr}; seeding ({'quick' if args.quick else 'full'} data set)")
    seeder = Seeder(src)
    t0 = time.monotonic()
    needed = {"standard" if s == "warm" else s for s in wanted}
    for name in ("standard", "many", "shared"):
        if name in needed:
            seed(seeder, scenarios[name])
    views = {s: walk_source(src, scenarios[s]) for s in wanted}
    unique = {s: sum(b["size"] for b in views[s][1].values()) for s in wanted}
    log(f"seeded {fmt_bytes(seeder.pushed_bytes)} in {time.monotonic() - t0:.1f}s; unique bytes per "
        f"scenario: " + ", ".join(f"{s} {fmt_bytes(unique[s])} ({len(views[s][0])} manifests, "
                                  f"{len(scenarios[s].tags())} tags)" for s in wanted))

    results = {s: {t: [] for t in TOOLS} for s in wanted}
    failures = []
    warm_dest = {}
    runs = 1 if args.quick else args.runs
    n_manifests = {s: len(views[s][0]) for s in wanted}
    n_blobs = {s: sum(len(i["repos"]) for i in views[s][1].values()) for s in wanted}
    for scen in wanted:
        data = scenarios[scen]
        if scen == "warm":
            for tool in TOOLS:
                if tool not in warm_dest:
                    dst = runner.new_registry(f"warm-{tool}")
                    log(f"warm: populating {dst.addr} with a cold standard run of {tool} (not measured)")
                    for attempt in range(1, 4):
                        r = runner.run_tool(tool, data, src, dst, f"warm-prep-{tool}-{attempt}")
                        bad = r["failure"] or verify(dst, views[scen], tool)
                        if not bad:
                            break
                        # a failed copy is a failure of the benchmark, but warm still needs a full
                        # destination: re-run into it, as the next resync would
                        failures.append(f"warm-prep-{tool}-{attempt}: {bad}")
                        log(f"!!! warm-prep-{tool}-{attempt} FAILED:\n  {bad}")
                        if args.fail_fast or attempt == 3:
                            raise BenchError(f"warm: could not prepare the destination with {tool}")
                    warm_dest[tool] = dst
        for i in range(runs):
            order = TOOLS if i % 2 == 0 else TOOLS[::-1]
            for tool in order:
                if scen == "warm":
                    dst = warm_dest[tool]
                else:
                    dst = runner.new_registry(f"{scen}-{tool}-{i + 1}")
                tag = f"{scen}-{tool}-{i + 1}"
                r = runner.run_tool(tool, data, src, dst, tag)
                bad = verify(dst, views[scen], tool)
                if bad or r["failure"]:
                    r["failure"] = "\n  ".join(x for x in (r["failure"], bad) if x)
                results[scen][tool].append(r)
                status = (f"verified {n_manifests[scen]} manifests, {n_blobs[scen]} blobs"
                          if not r["failure"] else "FAILED")
                log(f"{scen} run {i + 1} {tool}: {r['wall']:.2f}s, {r['rss_kb'] / 1024:.0f} MiB RSS, "
                    f"src {r['src']['total']} req ({fmt_bytes(r['src']['blob_get_bytes'])} blobs), "
                    f"dst {r['dst']['total']} req; CPU tool {r['cpu_tool']:.1f}s src {r['cpu_src']:.1f}s "
                    f"dst {r['cpu_dst']:.1f}s other {r['cpu_other']:.1f}s; {status}")
                if r["failure"]:
                    failures.append(f"{tag}: {r['failure']}")
                    log(f"!!! {tag} FAILED:\n  {r['failure']}")
                    if args.fail_fast:
                        raise BenchError(f"stopping at the first failure (--fail-fast)")
                keep_for_warm = (scen == "standard" and "warm" in wanted and not r["failure"])
                if keep_for_warm:
                    old = warm_dest.pop(tool, None)
                    if old:
                        old.stop(remove=not args.keep_dest)
                    warm_dest[tool] = dst  # the last good standard run: warm re-runs against it
                elif scen != "warm":
                    dst.stop(remove=not args.keep_dest)
        if scen == "warm":
            for d in warm_dest.values():
                d.stop(remove=not args.keep_dest)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "im_args": args.im_arg,
        "imagemirror_version": subprocess.run([args.bin, "--version"], capture_output=True,
                                              text=True).stdout.strip().split()[-1],
        "skopeo_version": subprocess.run(["skopeo", "--version"], capture_output=True,
                                         text=True).stdout.strip(),
        "registry_version": "docker-registry " + subprocess.run(
            ["docker-registry", "--version"], capture_output=True, text=True).stdout.strip().split()[-1],
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": runs,
    }
    md = report(results, unique, meta, failures)
    with open(os.path.join(args.out, "bench-results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "bench-results.json"), "w") as f:
        json.dump({"meta": meta, "unique_bytes": unique, "results": results}, f, indent=1)
    print(md)
    log(f"report: {os.path.join(args.out, 'bench-results.md')}")
    if failures:
        log(f"FAILED: {len(failures)} run(s) failed (a tool exited non-zero or the destination "
            f"differs from the source); see 'Failures' in the report")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
