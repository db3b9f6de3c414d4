"""The markdown report."""

import statistics

from common import *  # noqa: F401,F403 (shared constants and helpers)

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
    net = "HTTPS (private CA)" if meta.get("tls") else "plain HTTP"
    if meta.get("rtt_ms"):
        net += f"; source behind a latency proxy adding {meta['rtt_ms']:g} ms of round trip"
    if meta.get("dest_rtt_ms"):
        net += f"; destination behind one adding {meta['dest_rtt_ms']:g} ms"
    if meta.get("proxy_speed"):
        net += f" ({meta['proxy_speed']})"
    lines.append(f"Network: {net}.")
    lines.append("")
    lines.append("| scenario | tool | wall (median) | im/skopeo | peak RSS | source requests | "
                 "destination requests | bytes read from source / unique | CPU s: tool / src reg / dst reg / other "
                 "| tool CPU s per GiB | connections src / dst | protocol | settled concurrency |")
    lines.append("|---|---|---:|---:|---:|---|---|---|---|---:|---|---|---|")
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
                    lines.append(f"| {scen} | {tool} | all runs FAILED ({walls}) | | | | | | | | | | |")
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
            dst = fmt_methods(runs, 'dst')
            if "written" in runs[0]:
                dst = f"layout: {fmt_bytes(statistics.median(r['written'] for r in runs))} written"
            per_gib = (f"{statistics.median(r['cpu_tool'] for r in runs) / (u / (1 << 30)):.2f}"
                       if u else "-")
            conns = " / ".join(f"{statistics.median(r[side]['conns'] for r in runs):g}"
                               if "conns" in runs[0][side] else "-" for side in ("src", "dst"))
            protos = set()
            for r in runs:
                for side in ("src", "dst"):
                    protos |= set(r[side].get("protocols", {}))
            settled = "; ".join(sorted({f"{reg} {n}/{cap}" for r in runs
                                        for n, cap, reg in r.get("settled", [])}))
            lines.append(f"| {scen} | {tool} | {med[tool]:.2f} s ({walls}) | {ratio} | {rss:.1f} MiB | "
                         f"{fmt_methods(runs, 'src')} | {dst} | "
                         f"{fmt_bytes(read)} / {fmt_bytes(u)} = {rel} | {cpu} | {per_gib} | {conns} | "
                         f"{', '.join(sorted(protos))} | {settled or '-'} |")
    lines.append("")
    lines.append("Wall: median of the runs (each run in parentheses), from `/usr/bin/time -v`; "
                 "im/skopeo: ratio of the medians (below 1 means imagemirror is faster). "
                 "Requests: counted in each registry's access log during the run, median per method. "
                 "Bytes read: sum of the response sizes of `GET …/blobs/…` on the source; unique: the "
                 "sum of the sizes of the distinct blobs the scenario references (1.00× means every "
                 "byte was read once). CPU: user+system seconds of the tool and of each registry "
                 "process during the run, and of everything else on the machine (other users' builds: "
                 "a high number means the run competed for the CPUs; the latency proxies' CPU is left out of it). "
                 "CPU per GiB: the tool's CPU seconds over the scenario's unique bytes. Connections: TCP "
                 "connections the tool opened to each registry (or its latency proxy): its connect() calls "
                 "to that port, traced with `strace --seccomp-bpf -e trace=connect` (exact). Protocol: as the registries' access logs "
                 "record it. Settled concurrency: imagemirror's adaptive limit per registry at the end "
                 "(of the cap). Cold scenarios copy into a fresh registry every run; warm "
                 "re-runs standard against a destination that already has everything. Export copies the standard "
                 "set into one OCI layout directory (`oci:<dir>:<name>` destinations against one `skopeo copy --all` "
                 "per tag into `oci:<dir>:<name>:<tag>`; skopeo converts Docker images to OCI there, imagemirror keeps "
                 "every digest); \"written\" is the size of the layout's blobs after the run. Every run is "
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
