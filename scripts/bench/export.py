"""The export scenario: the standard data set from a registry into one OCI image layout directory
(air-gapped export), imagemirror (`oci:<dir>:<name>` destinations, one process) against one
`skopeo copy --all` per tag into the same kind of layout (one shared directory, ref names
`<name>:<tag>`), in the same run. Measures wall time, peak RSS and the bytes the layout holds."""

import json
import os
import shlex
import subprocess
import time

from common import *  # noqa: F401,F403 (shared constants and helpers)


def layout_name(repo):
    """The ref-name prefix of a source repository in the shared layout (as for registries)."""
    return dest_repo(repo)


def write_yaml(path, scenario, src, layout):
    write_mirror_yaml(path, scenario, src,
                      lambda repo: {"repository": f"oci:{layout}:{layout_name(repo)}"})


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def run_export(runner, tool, scenario, src, tag, parse_time_v):
    args = runner.args
    rdir = os.path.join(runner.work, "runs", tag)
    os.makedirs(rdir, exist_ok=True)
    os.chmod(rdir, 0o777)
    layout = os.path.join(rdir, "layout")
    timef = os.path.join(rdir, "time.txt")
    outf = os.path.join(rdir, "output.log")
    env = dict(os.environ)
    if tool == "imagemirror":
        yaml = os.path.join(rdir, "export.yaml")
        write_yaml(yaml, scenario, src, layout)
        cmd = [args.bin, "mirror", "-f", yaml] + args.im_arg
        if TLS:
            cmd += ["--ca-file", TLS["ca"]]
        env.setdefault("IMAGEMIRROR_LOG_LEVEL", "warn")
        env["DOCKER_CONFIG"] = rdir
    else:
        home = os.path.join(rdir, "home")
        os.makedirs(home)
        os.chmod(home, 0o777)
        env.update(HOME=home, XDG_DATA_HOME=os.path.join(home, "data"),
                   XDG_RUNTIME_DIR=home, XDG_CONFIG_HOME=os.path.join(home, "config"))
        # skopeo converts Docker images to OCI when writing a layout, so --preserve-digests
        # cannot be asked of it here; imagemirror keeps every digest.
        lines = ["set -e"]
        for repo, t in scenario.tags():
            lines.append(" ".join(shlex.quote(a) for a in [
                "skopeo", "--policy", os.path.join(runner.work, "policy.json"), "--tmpdir", home,
                "copy", "--all", *skopeo_tls_flags(dest=False),
                f"docker://{src.front}/{repo}:{t}", f"oci:{layout}:{layout_name(repo)}:{t}"]))
        script = os.path.join(rdir, "skopeo-export.sh")
        with open(script, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(script, 0o755)
        cmd = ["sh", script]
        if runner.skopeo_as_nobody:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    full = ["/usr/bin/time", "-v", "-o", timef] + cmd
    os.sync()
    src_off = src.log_offset()
    cpu0 = (src.cpu(), machine_busy_seconds())
    t0 = time.monotonic()
    with open(outf, "wb") as out:
        rc = subprocess.call(full, stdout=out, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    (src_end,) = settle(src)
    cpu1 = (src.cpu(), machine_busy_seconds())
    failure = None
    if rc != 0:
        with open(outf, errors="replace") as f:
            text = f.read()
        failure = f"{tool} export exited {rc}; see {outf}:\n    " + "\n    ".join(text[-1500:].splitlines())
    t = parse_time_v(timef)
    tool_cpu = t.get("user", 0) + t.get("sys", 0)
    busy = cpu1[1] - cpu0[1]
    written = dir_bytes(os.path.join(layout, "blobs")) if os.path.isdir(layout) else 0
    return {
        "failure": failure,
        "wall": t.get("wall", elapsed),
        "rss_kb": t.get("rss_kb", 0),
        "cpu_tool": tool_cpu,
        "cpu_src": cpu1[0] - cpu0[0],
        "cpu_dst": 0.0,
        "cpu_other": max(0.0, busy - tool_cpu - (cpu1[0] - cpu0[0])),
        "src": src.requests_between(src_off, src_end),
        "dst": {"methods": {}, "statuses": {}, "blob_get_bytes": 0, "total": 0},
        "written": written,
        "layout": layout,
    }


def verify_layout(layout, source_view, tool, scenario):
    """imagemirror: every source manifest byte-identical in blobs/, every tag pointing at the
    source's digest, every blob present with its size. skopeo (which converts Docker images):
    every tag present."""
    manifests, blobs = source_view
    errors = []
    try:
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return f"VERIFICATION FAILED after {tool}: {layout}/index.json: {e}"
    tags = {}
    for m in index.get("manifests", []):
        name = (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        if name:
            tags[name] = m.get("digest")
    blob_dir = os.path.join(layout, "blobs", "sha256")
    for repo, t in scenario.tags():
        name = f"{layout_name(repo)}:{t}"
        if name not in tags:
            errors.append(f"{name}: not in index.json")
        elif tool == "imagemirror":
            _, body = manifests[(repo, t)]
            if tags[name] != sha256_digest(body):
                errors.append(f"{name}: {tags[name]}, source has {sha256_digest(body)}")
    if tool == "imagemirror":
        for (repo, ref), (_, body) in manifests.items():
            path = os.path.join(blob_dir, sha256_digest(body)[7:])
            try:
                with open(path, "rb") as f:
                    if f.read() != body:
                        errors.append(f"{repo}@{ref}: manifest bytes differ in {path}")
            except OSError:
                errors.append(f"{repo}@{ref}: {path} missing")
        for digest, info in blobs.items():
            path = os.path.join(blob_dir, digest[7:])
            try:
                size = os.path.getsize(path)
                if size != info["size"]:
                    errors.append(f"blob {digest}: {size} bytes, expected {info['size']}")
            except OSError:
                errors.append(f"blob {digest}: missing")
    if errors:
        shown = "\n    ".join(errors[:20])
        return f"VERIFICATION FAILED after {tool}: {len(errors)} problem(s) in {layout}:\n    {shown}"
    return None
