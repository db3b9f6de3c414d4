#!/usr/bin/env bash
# Checks of the Helm chart in charts/imagemirror.
#
#   scripts/chart-test.sh [path-to-imagemirror-binary]     (default: target/debug/imagemirror)
#
# Uses helm from PATH or <repo>/.bin/helm (scripts/install-helm.sh installs it), and python3 with
# PyYAML (installed with pip when missing) to assert on the rendered manifests. Each check prints
# "ok - <name>" or "not ok - <name>" (with the reason as "#" lines); the last line is
# "N passed, M failed", and the exit status is non-zero when any check failed.
#
# The binary is needed for one check: every --flag the Deployment passes must appear in
# `<binary> controller --help`. A missing binary fails that check; it is never skipped.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 ]]; then
  BIN="$1"
  [[ "$BIN" == /* ]] || BIN="$PWD/$BIN"   # relative to where the script was started
else
  BIN="$REPO_DIR/target/debug/imagemirror"
fi
cd "$REPO_DIR"
CHART="charts/imagemirror"
RELEASE="imagemirror"
NS="imagemirror"

if command -v helm >/dev/null 2>&1; then
  HELM="$(command -v helm)"
elif [[ -x "$REPO_DIR/.bin/helm" ]]; then
  HELM="$REPO_DIR/.bin/helm"
else
  echo "chart-test: helm not found on PATH nor at .bin/helm; run scripts/install-helm.sh first" >&2
  exit 2
fi

if [[ ! -f "$CHART/crds/imagemirror.yaml" ]]; then
  echo "not ok - chart CRD present"
  echo "# $CHART/crds/imagemirror.yaml is missing: copy crds/imagemirror.yaml there (the chart ships"
  echo "# the generated CRD; a test keeps the two identical)"
  echo "0 passed, 1 failed"
  exit 1
fi

if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  echo "chart-test: installing PyYAML for the manifest assertions" >&2
  python3 -m pip install --quiet pyyaml >&2 ||
    python3 -m pip install --quiet --break-system-packages pyyaml >&2 ||
    true
  if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    echo "chart-test: python3 cannot import yaml; install PyYAML (pip install pyyaml, or apt-get install python3-yaml)" >&2
    exit 2
  fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PASSED=0
FAILED=0

# check NAME CMD...: run CMD; ok when it exits 0, otherwise "not ok" with its output as comments.
check() {
  local name="$1"
  shift
  local out
  if out="$("$@" 2>&1)"; then
    echo "ok - $name"
    PASSED=$((PASSED + 1))
  else
    echo "not ok - $name"
    if [[ -n "$out" ]]; then
      printf '%s\n' "$out" | sed 's/^/#   /'
    fi
    FAILED=$((FAILED + 1))
  fi
}

# render OUTFILE [helm args...]: helm template into OUTFILE.
render() {
  local outfile="$1"
  shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NS" "$@" >"$outfile"
}

# render_fails PATTERN [helm args...]: helm template must fail, and its error must match PATTERN
# (so a render that fails for an unrelated reason does not count).
render_fails() {
  local pattern="$1"
  shift
  local err
  if err="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NS" "$@" 2>&1 >/dev/null)"; then
    echo "helm template $* rendered, but must be refused"
    return 1
  fi
  if ! grep -Eq -- "$pattern" <<<"$err"; then
    echo "helm template $* failed, but not with an error matching /$pattern/:"
    echo "$err"
    return 1
  fi
}

PY="$TMP/chart_assert.py"
cat >"$PY" <<'PYEOF'
"""Assertions on rendered chart manifests. Usage: chart_assert.py CHECK ARGS...; exit 1 + reasons on failure."""
import re
import sys

import yaml

RELEASE_NS = "imagemirror"
CONTROLLER_RULES = {
    ("imagemirror.dev", "imagemirrors", v) for v in ("get", "list", "watch", "patch")
} | {
    ("imagemirror.dev", "imagemirrors/status", v) for v in ("get", "patch")
} | {
    ("", "secrets", v) for v in ("get", "list", "watch")
} | {
    ("", "events", v) for v in ("create", "patch")
} | {
    ("events.k8s.io", "events", v) for v in ("create", "patch")
}

errors = []


def expect(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def of_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = of_kind(docs, kind)
    if len(found) != 1:
        errors.append(f"expected exactly one {kind}, found {len(found)}")
        return None
    return found[0]


def container(docs):
    dep = one(docs, "Deployment")
    if dep is None:
        return None, None
    cs = dep["spec"]["template"]["spec"].get("containers", [])
    c = next((c for c in cs if c.get("name") == "controller"), None)
    expect(c is not None, "Deployment has no container named controller")
    return dep, c


def args(docs):
    _, c = container(docs)
    return (c or {}).get("args", [])


def flag_values(docs, flag):
    out = []
    for a in args(docs):
        if a == flag:
            out.append(None)
        elif a.startswith(flag + "="):
            out.append(a[len(flag) + 1:])
    return out


def rule_tuples(rules):
    out = set()
    for r in rules or []:
        names = tuple(sorted(r.get("resourceNames", []) or []))
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.add((g, res, v) + ((names,) if names else ()))
    return out


def is_lease_role(d):
    return d["metadata"]["name"].endswith(("-leader-election", "-shard-leases"))


def check_controller_binding(binding, kind, name, where):
    ref = binding.get("roleRef", {})
    expect(ref.get("kind") == kind and ref.get("name") == name,
           f"{where}: roleRef is {ref}, expected {kind}/{name}")
    subjects = binding.get("subjects", [])
    expect(subjects == [{"kind": "ServiceAccount", "name": sa_name(), "namespace": RELEASE_NS}],
           f"{where}: subjects are {subjects}, expected the controller ServiceAccount in {RELEASE_NS}")


_docs = None


def sa_name():
    dep, _ = container(_docs)
    return dep["spec"]["template"]["spec"].get("serviceAccountName") if dep else None


def c_no_wildcards(*files):
    roles = 0
    for f in files:
        for d in load(f):
            if d.get("kind") not in ("Role", "ClusterRole"):
                continue
            roles += 1
            where = f"{f}: {d['kind']} {d['metadata'].get('namespace', '')}/{d['metadata']['name']}"
            expect("aggregationRule" not in d, f"{where}: aggregationRule")
            for r in d.get("rules", []):
                for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                    for v in r.get(field, []) or []:
                        expect("*" not in v, f"{where}: wildcard {v!r} in {field}")
                expect(r.get("verbs"), f"{where}: rule without verbs")
    expect(roles > 0, "no Role or ClusterRole rendered at all")


def c_rbac_cluster(f):
    global _docs
    _docs = docs = load(f)
    roles = [d for d in of_kind(docs, "Role") if not is_lease_role(d)]
    expect(not roles, f"Roles rendered while watching all namespaces: {[r['metadata'] for r in roles]}")
    expect(not of_kind(docs, "RoleBinding") or all(is_lease_role(d) for d in of_kind(docs, "RoleBinding")),
           "RoleBindings rendered while watching all namespaces")
    cr = one(docs, "ClusterRole")
    crb = one(docs, "ClusterRoleBinding")
    if cr:
        got = rule_tuples(cr.get("rules"))
        expect(got == CONTROLLER_RULES,
               f"ClusterRole rules differ: extra {sorted(got - CONTROLLER_RULES)}, missing {sorted(CONTROLLER_RULES - got)}")
        if crb:
            check_controller_binding(crb, "ClusterRole", cr["metadata"]["name"], "ClusterRoleBinding")


def c_rbac_namespaced(f, *namespaces):
    global _docs
    _docs = docs = load(f)
    expect(not of_kind(docs, "ClusterRole"), "a ClusterRole is rendered although watchNamespaces is set")
    expect(not of_kind(docs, "ClusterRoleBinding"), "a ClusterRoleBinding is rendered although watchNamespaces is set")
    roles = {d["metadata"].get("namespace"): d for d in of_kind(docs, "Role") if not is_lease_role(d)}
    bindings = {d["metadata"].get("namespace"): d for d in of_kind(docs, "RoleBinding") if not is_lease_role(d)}
    expect(sorted(roles) == sorted(namespaces), f"Roles in {sorted(roles)}, expected in {sorted(namespaces)}")
    expect(sorted(bindings) == sorted(namespaces), f"RoleBindings in {sorted(bindings)}, expected in {sorted(namespaces)}")
    for ns in namespaces:
        if ns in roles:
            got = rule_tuples(roles[ns].get("rules"))
            expect(got == CONTROLLER_RULES,
                   f"Role in {ns}: extra {sorted(got - CONTROLLER_RULES)}, missing {sorted(CONTROLLER_RULES - got)}")
            if ns in bindings:
                check_controller_binding(bindings[ns], "Role", roles[ns]["metadata"]["name"], f"RoleBinding in {ns}")
    expect(flag_values(docs, "--namespace") == list(namespaces),
           f"--namespace args are {flag_values(docs, '--namespace')}, expected {list(namespaces)}")


def c_leader(f, state):
    global _docs
    _docs = docs = load(f)
    dep, _ = container(docs)
    lease_roles = [d for d in of_kind(docs, "Role") if is_lease_role(d)]
    lease_bindings = [d for d in of_kind(docs, "RoleBinding") if is_lease_role(d)]
    strategy = (dep or {}).get("spec", {}).get("strategy", {}).get("type")
    if state == "off":
        for flag in ("--leader-elect", "--leader-election-namespace", "--lease-name"):
            expect(not flag_values(docs, flag), f"{flag} passed although leader election is off")
        expect(not lease_roles and not lease_bindings, "lease Role/RoleBinding rendered although leader election is off")
        expect(strategy == "Recreate", f"strategy is {strategy}, expected Recreate without leader election")
        return
    expect(flag_values(docs, "--leader-elect") == [None], f"--leader-elect (no value) not passed exactly once: {args(docs)}")
    expect(flag_values(docs, "--leader-election-namespace") == [RELEASE_NS],
           f"--leader-election-namespace is {flag_values(docs, '--leader-election-namespace')}, expected [{RELEASE_NS}]")
    lease = flag_values(docs, "--lease-name")
    expect(len(lease) == 1 and lease[0], f"--lease-name is {lease}")
    expect(len(lease_roles) == 1 and len(lease_bindings) == 1,
           f"expected one lease Role and RoleBinding, found {len(lease_roles)} and {len(lease_bindings)}")
    if lease_roles and len(lease) == 1:
        r = lease_roles[0]
        expect(r["metadata"].get("namespace") == RELEASE_NS, f"lease Role is in {r['metadata'].get('namespace')}")
        want = {("coordination.k8s.io", "leases", "create")} | {
            ("coordination.k8s.io", "leases", v, (lease[0],)) for v in ("get", "update", "patch")}
        got = rule_tuples(r.get("rules"))
        expect(got == want, f"lease Role rules differ: extra {sorted(got - want, key=str)}, missing {sorted(want - got, key=str)}")
    if lease_bindings and lease_roles:
        b = lease_bindings[0]
        expect(b["metadata"].get("namespace") == RELEASE_NS, f"lease RoleBinding is in {b['metadata'].get('namespace')}")
        check_controller_binding(b, "Role", lease_roles[0]["metadata"]["name"], "lease RoleBinding")
    expect(strategy == "RollingUpdate", f"strategy is {strategy}, expected RollingUpdate with leader election")


def c_sharded(f, shards, replicas, selector=""):
    global _docs
    _docs = docs = load(f)
    dep, _ = container(docs)
    expect(flag_values(docs, "--shards") == [shards], f"--shards is {flag_values(docs, '--shards')}, expected [{shards}]")
    expect(flag_values(docs, "--leader-election-namespace") == [RELEASE_NS],
           f"--leader-election-namespace is {flag_values(docs, '--leader-election-namespace')}, expected [{RELEASE_NS}]")
    for flag in ("--leader-elect", "--lease-name"):
        expect(not flag_values(docs, flag), f"{flag} passed although the shard Leases replace leader election")
    want_sel = [selector] if selector else []
    expect(flag_values(docs, "--selector") == want_sel, f"--selector is {flag_values(docs, '--selector')}, expected {want_sel}")
    expect((dep or {}).get("spec", {}).get("replicas") == int(replicas), f"replicas differ from {replicas}")
    strategy = (dep or {}).get("spec", {}).get("strategy", {}).get("type")
    expect(strategy == "RollingUpdate", f"strategy is {strategy}, expected RollingUpdate with shard Leases")
    roles = [d for d in of_kind(docs, "Role") if d["metadata"]["name"].endswith("-shard-leases")]
    bindings = [d for d in of_kind(docs, "RoleBinding") if d["metadata"]["name"].endswith("-shard-leases")]
    expect(len(roles) == 1 and len(bindings) == 1, f"expected one shard-lease Role and RoleBinding, found {len(roles)} and {len(bindings)}")
    expect(not [d for d in of_kind(docs, "Role") if d["metadata"]["name"].endswith("-leader-election")],
           "leader-election Role rendered although sharded")
    if roles:
        r = roles[0]
        expect(r["metadata"].get("namespace") == RELEASE_NS, f"shard-lease Role is in {r['metadata'].get('namespace')}")
        want = {("coordination.k8s.io", "leases", v) for v in ("get", "list", "create", "update", "patch", "delete")}
        got = rule_tuples(r.get("rules"))
        expect(got == want, f"shard-lease Role rules differ: extra {sorted(got - want, key=str)}, missing {sorted(want - got, key=str)}")
    if roles and bindings:
        b = bindings[0]
        expect(b["metadata"].get("namespace") == RELEASE_NS, f"shard-lease RoleBinding is in {b['metadata'].get('namespace')}")
        check_controller_binding(b, "Role", roles[0]["metadata"]["name"], "shard-lease RoleBinding")


def c_pdb(f, state, replicas):
    docs = load(f)
    dep = one(docs, "Deployment")
    if dep:
        expect(dep["spec"].get("replicas") == int(replicas), f"Deployment replicas {dep['spec'].get('replicas')}, expected {replicas}")
    pdbs = of_kind(docs, "PodDisruptionBudget")
    if state == "absent":
        expect(not pdbs, "PodDisruptionBudget rendered with a single replica")
        return
    pdb = one(docs, "PodDisruptionBudget")
    if pdb and dep:
        expect(pdb["spec"].get("selector") == dep["spec"]["selector"], "PDB selector differs from the Deployment's")
        expect("minAvailable" in pdb["spec"], "PDB has no minAvailable")


def c_security(f):
    docs = load(f)
    dep, c = container(docs)
    if not dep:
        return
    pod = dep["spec"]["template"]["spec"]
    psc = pod.get("securityContext") or {}
    expect(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot is not true")
    expect(psc.get("runAsUser") == 65532, f"pod securityContext.runAsUser is {psc.get('runAsUser')}")
    expect((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "pod seccompProfile is not RuntimeDefault")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        n = c.get("name")
        expect(sc.get("runAsNonRoot") is True, f"container {n}: runAsNonRoot is not true")
        expect(sc.get("runAsUser") == 65532, f"container {n}: runAsUser is {sc.get('runAsUser')}")
        expect(sc.get("readOnlyRootFilesystem") is True, f"container {n}: readOnlyRootFilesystem is not true")
        expect(sc.get("allowPrivilegeEscalation") is False, f"container {n}: allowPrivilegeEscalation is not false")
        expect((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"container {n}: capabilities.drop is not [ALL]")
        expect(not (sc.get("capabilities") or {}).get("add"), f"container {n}: adds capabilities")
        expect(sc.get("privileged") in (None, False), f"container {n}: privileged")
        expect((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"container {n}: seccompProfile is not RuntimeDefault")
    expect(not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), "pod uses host namespaces")


def c_pod(f):
    docs = load(f)
    dep, c = container(docs)
    if not c:
        return
    expect(c.get("command") == ["/imagemirror"], f"command is {c.get('command')}")
    a = c.get("args", [])
    expect(a[:1] == ["controller"], f"args do not start with the controller subcommand: {a}")
    addr = flag_values(docs, "--metrics-addr")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    expect("metrics" in ports, f"no container port named metrics: {c.get('ports')}")
    expect(len(addr) == 1 and addr[0].rsplit(":", 1)[-1] == str(ports.get("metrics")),
           f"--metrics-addr {addr} does not listen on the metrics port {ports.get('metrics')}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        expect(get.get("path") == path and get.get("port") == "metrics",
               f"{probe} is {c.get(probe)}, expected GET {path} on port metrics")
    env = {e["name"]: e for e in c.get("env", [])}
    for name, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        got = ((env.get(name) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        expect(got == field, f"env {name} is not the downward API's {field}")
    res = c.get("resources") or {}
    expect(res.get("requests", {}).get("cpu") == "50m" and res.get("requests", {}).get("memory") == "64Mi"
           and res.get("limits", {}).get("memory") == "512Mi", f"resources are {res}")
    expect(dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds") == 30, "terminationGracePeriodSeconds is not 30")
    svc = one(docs, "Service")
    if svc:
        sp = svc["spec"].get("ports", [])
        expect(any(p.get("targetPort") == "metrics" and p.get("port") == ports.get("metrics") for p in sp),
               f"metrics Service ports {sp} do not target the metrics port")
        expect(svc["spec"].get("selector") == dep["spec"]["selector"]["matchLabels"], "Service selector differs from the pods'")
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    for k, v in dep["spec"]["selector"]["matchLabels"].items():
        expect(labels.get(k) == v, f"pod template lacks selector label {k}={v}")
    for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        expect(k in dep["metadata"].get("labels", {}), f"Deployment lacks label {k}")
    for f_ in ("--concurrency", "--registry-concurrency", "--reconcile-concurrency", "--log-format", "--log-level",
               "--throttle-timeout", "--stall-window", "--stall-min-bytes"):
        expect(len(flag_values(docs, f_)) == 1, f"{f_} not passed exactly once: {a}")
    expect(flag_values(docs, "--ca-file") == [], "--ca-file passed although extraCABundle is disabled")
    expect(flag_values(docs, "--rate-limit") == [], "--rate-limit passed although rateLimit is null")
    sa = one(docs, "ServiceAccount")
    if sa:
        expect(sa["metadata"]["name"] == dep["spec"]["template"]["spec"].get("serviceAccountName"),
               "the Deployment does not run as the rendered ServiceAccount")


def c_values(f, *pairs):
    """pairs: --flag=value expected in the args (exactly once)."""
    docs = load(f)
    for p in pairs:
        flag, _, val = p.partition("=")
        got = flag_values(docs, flag)
        expect(got == [val], f"{flag} is {got}, expected [{val!r}]")


def c_ca(f, source, name, key):
    docs = load(f)
    dep, c = container(docs)
    if not c:
        return
    pod = dep["spec"]["template"]["spec"]
    ca = flag_values(docs, "--ca-file")
    expect(len(ca) == 1, f"--ca-file is {ca}, expected one")
    if len(ca) != 1:
        return
    mounts = [m for m in c.get("volumeMounts", []) if ca[0].startswith(m["mountPath"].rstrip("/") + "/")]
    expect(len(mounts) == 1, f"no volume mounted at the directory of --ca-file {ca[0]}")
    if not mounts:
        return
    m = mounts[0]
    expect(m.get("readOnly") is True, "the CA bundle mount is not readOnly")
    rel = ca[0][len(m["mountPath"].rstrip("/")) + 1:]
    vol = next((v for v in pod.get("volumes", []) if v["name"] == m["name"]), None)
    expect(vol is not None, f"volume {m['name']} not defined")
    if vol is None:
        return
    if source == "secret":
        src = vol.get("secret") or {}
        expect(src.get("secretName") == name, f"CA volume is {vol}, expected Secret {name}")
    else:
        src = vol.get("configMap") or {}
        expect(src.get("name") == name, f"CA volume is {vol}, expected ConfigMap {name}")
    items = {i["path"]: i["key"] for i in src.get("items", [])} if src.get("items") else {key: key}
    expect(items.get(rel) == key, f"--ca-file {ca[0]} is not key {key} of the volume ({src})")


def c_servicemonitor(f, interval, label):
    docs = load(f)
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    if not sm or not svc:
        return
    k, _, v = label.partition("=")
    expect(sm["metadata"].get("labels", {}).get(k) == v, f"ServiceMonitor lacks label {label}")
    sel = sm["spec"]["selector"]["matchLabels"]
    expect(all(svc["metadata"]["labels"].get(a) == b for a, b in sel.items()), "ServiceMonitor does not select the metrics Service")
    eps = sm["spec"].get("endpoints", [])
    expect(len(eps) == 1 and eps[0].get("port") == "metrics" and eps[0].get("interval") == interval
           and eps[0].get("path") == "/metrics", f"ServiceMonitor endpoints are {eps}")


def c_flags_in_help(help_file, *files):
    with open(help_file) as fh:
        text = fh.read()
    known = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))
    expect(known, f"no --flags found in the help text:\n{text}")
    used = set()
    for f in files:
        for a in args(load(f)):
            if a.startswith("--"):
                used.add(a.split("=", 1)[0])
    expect(used, "no --flags in the rendered Deployment args")
    missing = sorted(used - known)
    expect(not missing, f"flags passed by the chart but unknown to `controller --help`: {missing}")


def leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def c_values_documented(values_file):
    """Every value is documented: its key, or a key above it, has a comment right above it."""
    documented = set()
    stack = []  # (indent, path)
    prev_comment = False
    with open(values_file) as fh:
        for line in fh:
            s = line.strip()
            if not s:
                prev_comment = False
                continue
            if s.startswith("#"):
                prev_comment = True
                continue
            m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
            if m and not s.startswith("-"):
                indent = len(m.group(1))
                while stack and stack[-1][0] >= indent:
                    stack.pop()
                path = (stack[-1][1] if stack else ()) + (m.group(2),)
                stack.append((indent, path))
                if prev_comment:
                    documented.add(path)
            prev_comment = False
    with open(values_file) as fh:
        values = yaml.safe_load(fh)
    for p in leaf_paths(values):
        expect(any(p[:i] in documented for i in range(1, len(p) + 1)),
               f"value {'.'.join(p)} has no comment")


def c_schema_covers(values_file, schema_file):
    import json
    with open(values_file) as fh:
        values = yaml.safe_load(fh)
    with open(schema_file) as fh:
        schema = json.load(fh)
    expect(schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"), "schema is not draft-07")
    expect(schema.get("additionalProperties") is False, "top level of the schema allows additional properties")

    def walk(v, s, path):
        where = ".".join(path) or "(top)"
        expect("type" in s or "anyOf" in s or "oneOf" in s, f"{where}: no type in the schema")
        if isinstance(v, dict) and "properties" in s:
            expect(s.get("additionalProperties") is False, f"{where}: schema object allows additional properties")
            for k, sub in v.items():
                if expect(k in s["properties"], f"{where}.{k}: not in the schema"):
                    walk(sub, s["properties"][k], path + (k,))
        for k in (s.get("properties") or {}) if isinstance(v, dict) else ():
            expect(k in v or k == "global", f"{where}.{k}: in the schema but not in values.yaml")
    walk(values, schema, ())


def c_notes(f):
    with open(f) as fh:
        text = fh.read()
    notes = text.split("NOTES:", 1)[1] if "NOTES:" in text else ""
    expect(notes, "no NOTES in the dry-run output")
    for needle in ("kubectl apply -f crds/", "kubectl -n mirrors create secret docker-registry",
                   "examples/", "kubectl get imgmirror -A", "--for=condition=Ready imgmirror/",
                   "describe imgmirror"):
        expect(needle in notes, f"NOTES do not mention {needle!r}")


CHECKS = {k[2:].replace("_", "-"): v for k, v in globals().items() if k.startswith("c_")}

if __name__ == "__main__":
    CHECKS[sys.argv[1]](*sys.argv[2:])
    for e in errors:
        print(e)
    sys.exit(1 if errors else 0)
PYEOF

assert() { python3 "$PY" "$@"; }

# --- lint ---------------------------------------------------------------------------------------
check "helm lint --strict $CHART" "$HELM" lint --strict "$CHART"
check "helm lint --strict with every feature on" "$HELM" lint --strict "$CHART" --namespace "$NS" \
  --set replicas=3 --set 'watchNamespaces={team-a,team-b}' --set extraCABundle.enabled=true \
  --set extraCABundle.secretName=registry-ca --set metrics.serviceMonitor.enabled=true \
  --set logFormat=json
check "values.yaml: every value has a comment" assert values-documented "$CHART/values.yaml"
check "values.schema.json: covers every value, rejects unknown keys" \
  assert schema-covers "$CHART/values.yaml" "$CHART/values.schema.json"

# --- default values -----------------------------------------------------------------------------
R_DEFAULT="$TMP/default.yaml"
check "helm template: default values" render "$R_DEFAULT"
check "default: ClusterRole + ClusterRoleBinding with exactly the controller's rules" assert rbac-cluster "$R_DEFAULT"
check "default: one replica, no leader election, Recreate strategy" assert leader "$R_DEFAULT" off
check "default: no PodDisruptionBudget" assert pdb "$R_DEFAULT" absent 1
check "default: restricted pod and container securityContext" assert security "$R_DEFAULT"
check "default: command, probes, metrics port, downward-API env, resources, Service" assert pod "$R_DEFAULT"
check "default: flags carry the default values" assert values "$R_DEFAULT" \
  --concurrency=8 --registry-concurrency=4 --reconcile-concurrency=32 --metrics-addr=0.0.0.0:8080 --log-format=text --log-level=info

# --- watchNamespaces ----------------------------------------------------------------------------
R_NS="$TMP/namespaces.yaml"
check "helm template: --set watchNamespaces={a,b}" render "$R_NS" --set 'watchNamespaces={a,b}'
check "watchNamespaces={a,b}: Role + RoleBinding in a and b, --namespace=a --namespace=b, no ClusterRole" \
  assert rbac-namespaced "$R_NS" a b

# --- replicas > 1 -------------------------------------------------------------------------------
R_HA="$TMP/replicas2.yaml"
check "helm template: --set replicas=2" render "$R_HA" --set replicas=2
check "replicas=2: --leader-elect, lease Role + RoleBinding in the release namespace" assert leader "$R_HA" on
check "replicas=2: PodDisruptionBudget" assert pdb "$R_HA" present 2
R_LE="$TMP/leader1.yaml"
check "helm template: --set leaderElection.enabled=true (one replica)" render "$R_LE" --set leaderElection.enabled=true
leader_without_pdb() { assert leader "$1" on && assert pdb "$1" absent 1; }
check "leaderElection.enabled=true: leader election on, no PodDisruptionBudget" leader_without_pdb "$R_LE"
check "refused: leaderElection.enabled=false with replicas=2" \
  render_fails 'several controllers' --set leaderElection.enabled=false --set replicas=2

# --- sharding -----------------------------------------------------------------------------------
R_SH="$TMP/sharded.yaml"
check "helm template: --set replicas=3 --set sharding.shards=9" render "$R_SH" --set replicas=3 --set sharding.shards=9
check "sharded: --shards=9, Lease namespace, no leader election, shard-lease Role, RollingUpdate" \
  assert sharded "$R_SH" 9 3
check "sharded: PodDisruptionBudget" assert pdb "$R_SH" present 3
R_SEL="$TMP/selector.yaml"
check "helm template: --set sharding.selector=imagemirror.dev/shard=a" render "$R_SEL" \
  --set replicas=2 --set sharding.shards=4 --set 'sharding.selector=imagemirror.dev/shard=a'
check "selector: passed as --selector" assert sharded "$R_SEL" 4 2 imagemirror.dev/shard=a
check "refused: sharding.shards=0" render_fails 'shards' --set sharding.shards=0
check "refused: sharding.shards=257" render_fails 'shards' --set sharding.shards=257
check "refused: leaderElection.enabled=true with sharding" \
  render_fails 'replace leader election' --set leaderElection.enabled=true --set sharding.shards=3

# --- other values -------------------------------------------------------------------------------
R_CA="$TMP/ca-secret.yaml"
check "helm template: extraCABundle from a Secret" render "$R_CA" \
  --set extraCABundle.enabled=true --set extraCABundle.secretName=registry-ca --set extraCABundle.key=bundle.pem
check "extraCABundle (Secret): mounted read-only, passed as --ca-file" assert ca "$R_CA" secret registry-ca bundle.pem
R_CACM="$TMP/ca-configmap.yaml"
check "helm template: extraCABundle from a ConfigMap" render "$R_CACM" \
  --set extraCABundle.enabled=true --set extraCABundle.configMapName=registry-ca
check "extraCABundle (ConfigMap): mounted read-only, passed as --ca-file" assert ca "$R_CACM" configmap registry-ca ca.crt
check "refused: extraCABundle.enabled without a ConfigMap or Secret" \
  render_fails 'schema' --set extraCABundle.enabled=true
R_SM="$TMP/servicemonitor.yaml"
check "helm template: ServiceMonitor, json logs, custom limits" render "$R_SM" \
  --set metrics.serviceMonitor.enabled=true --set metrics.serviceMonitor.interval=1m \
  --set metrics.serviceMonitor.labels.release=prometheus --set logFormat=json --set logLevel=debug \
  --set concurrency=16 --set registryConcurrency=2 --set reconcileConcurrency=64 --set metrics.port=9090 \
  --set chunkedThreshold=128MiB --set chunkSize=32MiB --set-json rateLimit=2.5 \
  --set throttleTimeout=30m --set stallWindow=2m --set stallMinBytes=4KiB
check "ServiceMonitor selects the metrics Service" assert servicemonitor "$R_SM" 1m release=prometheus
check "values reach the flags" assert values "$R_SM" \
  --concurrency=16 --registry-concurrency=2 --reconcile-concurrency=64 --metrics-addr=0.0.0.0:9090 --log-format=json --log-level=debug \
  --chunked-threshold=128MiB --chunk-size=32MiB --rate-limit=2.5 \
  --throttle-timeout=30m --stall-window=2m --stall-min-bytes=4KiB

# --- invalid values are refused -----------------------------------------------------------------
check "refused: replica=2 (unknown key)" render_fails '[Aa]dditional propert.*replica' --set replica=2
check "refused: logFormat=xml" render_fails 'logFormat' --set logFormat=xml
check "refused: concurrency=0" render_fails '(^|[^y])concurrency' --set concurrency=0
check "refused: registryConcurrency=0" render_fails 'registryConcurrency' --set registryConcurrency=0
check "refused: reconcileConcurrency=0" render_fails 'reconcileConcurrency' --set reconcileConcurrency=0
check "refused: chunkSize=16 parsecs" render_fails 'chunkSize' --set 'chunkSize=16 parsecs'
check "refused: rateLimit=0" render_fails 'rateLimit' --set rateLimit=0
check "refused: stallWindow=1 minute" render_fails 'stallWindow' --set 'stallWindow=1 minute'
check "refused: replicas=0" render_fails 'replicas' --set replicas=0
check "refused: image.tg=x (unknown nested key)" render_fails '[Aa]dditional propert.*tg' --set image.tg=x

# --- across all renders -------------------------------------------------------------------------
ALL=("$R_DEFAULT" "$R_NS" "$R_HA" "$R_LE" "$R_CA" "$R_CACM" "$R_SM" "$R_SH" "$R_SEL")
check "RBAC: no wildcard in any rule" assert no-wildcards "${ALL[@]}"

flags_known() {
  if [[ ! -x "$BIN" ]]; then
    echo "$BIN does not exist or is not executable (build it, or pass its path)"
    return 1
  fi
  if ! "$BIN" controller --help >"$TMP/help.txt" 2>&1; then
    echo "\`$BIN controller --help\` failed:"
    cat "$TMP/help.txt"
    return 1
  fi
  python3 "$PY" flags-in-help "$TMP/help.txt" "${ALL[@]}"
}
check "every Deployment flag is known to \`$BIN controller --help\`" flags_known

notes() {
  "$HELM" install "$RELEASE" "$CHART" --namespace "$NS" --dry-run=client >"$TMP/notes.txt" &&
    python3 "$PY" notes "$TMP/notes.txt"
}
check "NOTES.txt renders the getting-started steps" notes

check "$CHART/crds/imagemirror.yaml is identical to crds/imagemirror.yaml" \
  cmp "$CHART/crds/imagemirror.yaml" crds/imagemirror.yaml

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
