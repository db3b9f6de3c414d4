"""The synthetic data set: deterministic blobs, seeding through the registry API, and walking
and verifying what a registry holds."""

import hashlib
import json
import random
import zlib

from common import *  # noqa: F401,F403 (shared constants and helpers)

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
