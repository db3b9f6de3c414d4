#!/usr/bin/env python3
"""imagemirror vs skopeo sync, on the same synthetic data, between local registries.

Called by scripts/bench.sh (which builds the binary and cleans up); stdlib only. The data set
is in dataset.py, the registries and shared helpers in common.py, the report in report.py.

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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from common import *  # noqa: F401,F403 (shared constants and helpers)
from dataset import *  # noqa: F401,F403
from export import run_export, verify_layout
from report import fmt_bytes, report

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


def write_imagemirror_yaml(path, scenario, src, dst, referrers=False):
    extra = "  referrers:\n    enabled: true\n" if referrers else ""
    plain = "false" if TLS else "true"
    write_mirror_yaml(path, scenario, src,
                      lambda repo: {"repository": f"{dst.front}/{dest_repo(repo)}", "plainHTTP": plain},
                      extra)


def write_skopeo_yaml(path, scenario, src):
    if TLS:
        lines = [f"{src.front}:", "  tls-verify: true", f"  cert-dir: {TLS['cert_dir']}", "  images:"]
    else:
        lines = [f"{src.front}:", "  tls-verify: false", "  images:"]
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

    def new_registry(self, label, delay_ms=0.0):
        self.n_reg += 1
        reg = Registry(self.work, f"{self.n_reg:03d}-{label}", self.pidfile).start()
        return reg.add_latency(delay_ms)

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
            write_imagemirror_yaml(yaml, scenario, src, dst, self.args.referrers)
            cmd = [self.args.bin, "mirror", "-f", yaml] + self.args.im_arg
            if TLS:
                cmd += ["--ca-file", TLS["ca"]]
            env.setdefault("IMAGEMIRROR_LOG_LEVEL", "warn,imagemirror::concurrency=info")
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
                   *skopeo_tls_flags(), yaml, f"{dst.front}/{DEST_PREFIX}"]
            if self.skopeo_as_nobody:
                os.chmod(home, 0o777)
                cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        os.chmod(yaml, 0o644)
        tracef = os.path.join(rdir, "connects.strace")
        # time(1) waits for strace, which waits for the tool: its peak RSS and CPU are the
        # tool's (strace's own are far smaller: it wakes only at connect()).
        full = ["/usr/bin/time", "-v", "-o", timef] + traced(cmd, tracef)
        # Write back what earlier runs left dirty (and the removed registries' trees), so a run
        # does not pay for its predecessor's disk writes.
        os.sync()
        src_off, dst_off = src.log_offset(), dst.log_offset()
        proxies = [r.proxy for r in (src, dst) if r.proxy]
        cpu0 = (src.cpu(), dst.cpu(), machine_busy_seconds(), sum(p.cpu() for p in proxies))
        t0 = time.monotonic()
        with open(outf, "wb") as out:
            rc = subprocess.call(full, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        conns = count_connects(tracef, {int(src.front.rsplit(":", 1)[1]), int(dst.front.rsplit(":", 1)[1])})
        src_end, dst_end = settle(src, dst)
        cpu1 = (src.cpu(), dst.cpu(), machine_busy_seconds(), sum(p.cpu() for p in proxies))
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
        cpu_proxy = cpu1[3] - cpu0[3]
        src_req = src.requests_between(src_off, src_end)
        dst_req = dst.requests_between(dst_off, dst_end)
        if conns:
            src_req["conns"] = conns[int(src.front.rsplit(":", 1)[1])]
            dst_req["conns"] = conns[int(dst.front.rsplit(":", 1)[1])]
        settled = re.findall(r"settled at (\d+) of (\d+) for registry ([^\s\x1b]+)",
                             open(outf, errors="replace").read()) \
            if tool == "imagemirror" else []
        names = {src.front: "src", dst.front: "dst"}
        settled = [(n, cap, names.get(reg, reg)) for n, cap, reg in settled]
        return {
            "failure": failure,
            "wall": t.get("wall", elapsed),
            "rss_kb": t.get("rss_kb", 0),
            "cpu_tool": tool_cpu,
            "cpu_src": cpu1[0] - cpu0[0],
            "cpu_dst": cpu1[1] - cpu0[1],
            "cpu_proxy": cpu_proxy,
            "cpu_other": max(0.0, busy - tool_cpu - (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]) - cpu_proxy),
            "src": src_req,
            "dst": dst_req,
            "settled": settled,
        }


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
    ap.add_argument("--referrers", action="store_true", help="imagemirror with spec.referrers.enabled")
    ap.add_argument("--im-arg", action="append", default=[], help="extra `imagemirror mirror` argument")
    ap.add_argument("--tls", action="store_true", help="registries serve HTTPS (private CA)")
    ap.add_argument("--tool", action="append", choices=TOOLS, default=[],
                    help="run only this tool (repeatable; default both)")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added before the source")
    ap.add_argument("--dest-rtt-ms", type=float, default=0.0, help="round trip added before the destination")
    args = ap.parse_args()

    order = ["standard", "warm", "many", "shared", "export"]
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
    scenarios["export"] = scenarios["standard"]
    runner = Runner(args)
    if args.tls:
        make_ca(args.work)

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
    proxy_speed = None
    if args.rtt_ms or args.dest_rtt_ms:
        here = os.path.dirname(os.path.abspath(__file__))
        delay = max(args.rtt_ms, args.dest_rtt_ms) / 2
        proxy_speed = subprocess.run(
            [sys.executable, os.path.join(here, "latency_proxy.py"), "--selftest",
             "--delay-ms", f"{delay:g}", "--mib", "64" if args.quick else "512"],
            capture_output=True, text=True).stdout.strip()
        log(proxy_speed)
    src = runner.new_registry("source", args.rtt_ms / 2)
    log(f"source registry {src.addr}; seeding ({'quick' if args.quick else 'full'} data set)")
    seeder = Seeder(src)
    t0 = time.monotonic()
    needed = {"standard" if s in ("warm", "export") else s for s in wanted}
    for name in ("standard", "many", "shared"):
        if name in needed:
            seed(seeder, scenarios[name])
    views = {s: walk_source(src, scenarios[s]) for s in wanted}
    unique = {s: sum(b["size"] for b in views[s][1].values()) for s in wanted}
    log(f"seeded {fmt_bytes(seeder.pushed_bytes)} in {time.monotonic() - t0:.1f}s; unique bytes per "
        f"scenario: " + ", ".join(f"{s} {fmt_bytes(unique[s])} ({len(views[s][0])} manifests, "
                                  f"{len(scenarios[s].tags())} tags)" for s in wanted))

    tools = [t for t in TOOLS if not args.tool or t in args.tool]
    results = {s: {t: [] for t in tools} for s in wanted}
    failures = []
    warm_dest = {}
    runs = 1 if args.quick else args.runs
    n_manifests = {s: len(views[s][0]) for s in wanted}
    n_blobs = {s: sum(len(i["repos"]) for i in views[s][1].values()) for s in wanted}
    for scen in wanted:
        data = scenarios[scen]
        if scen == "warm":
            for tool in tools:
                if tool not in warm_dest:
                    dst = runner.new_registry(f"warm-{tool}", args.dest_rtt_ms / 2)
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
            order = tools if i % 2 == 0 else tools[::-1]
            for tool in order:
                tag = f"{scen}-{tool}-{i + 1}"
                if scen == "export":
                    r = run_export(runner, tool, data, src, tag, parse_time_v)
                    bad = verify_layout(r["layout"], views[scen], tool, data)
                    if not args.keep_dest:
                        shutil.rmtree(r["layout"], ignore_errors=True)
                    dst = None
                else:
                    dst = (warm_dest[tool] if scen == "warm"
                           else runner.new_registry(f"{scen}-{tool}-{i + 1}", args.dest_rtt_ms / 2))
                    r = runner.run_tool(tool, data, src, dst, tag)
                    bad = verify(dst, views[scen], tool)
                if bad or r["failure"]:
                    r["failure"] = "\n  ".join(x for x in (r["failure"], bad) if x)
                results[scen][tool].append(r)
                status = (f"verified {n_manifests[scen]} manifests, {n_blobs[scen]} blobs"
                          if not r["failure"] else "FAILED")
                if scen == "export" and tool == "skopeo" and not r["failure"]:
                    status = f"verified {len(data.tags())} tags present (skopeo converts Docker images)"
                if "written" in r:
                    status += f", {fmt_bytes(r['written'])} in the layout's blobs"
                log(f"{scen} run {i + 1} {tool}: {r['wall']:.2f}s, {r['rss_kb'] / 1024:.0f} MiB RSS, "
                    f"src {r['src']['total']} req ({fmt_bytes(r['src']['blob_get_bytes'])} blobs), "
                    f"dst {r['dst']['total']} req; conns {r['src'].get('conns', '-')}/{r['dst'].get('conns', '-')}; "
                    f"{'/'.join(sorted(set(r['src'].get('protocols', {})) | set(r['dst'].get('protocols', {}))))}; CPU tool {r['cpu_tool']:.1f}s src {r['cpu_src']:.1f}s "
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
                elif dst is not None and scen != "warm":
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
        "tls": args.tls,
        "rtt_ms": args.rtt_ms,
        "dest_rtt_ms": args.dest_rtt_ms,
        "proxy_speed": proxy_speed,
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
