"""Checks the deployment files in deploy/ (run by tests/deploy.rs).

- every built-in Kubernetes manifest of the base and of the CPU and TLS
  overlays (their JSON patches applied here) validates with
  `kubernetes-validate --strict`; the TLS overlay mounts its Secret and
  moves every probe to the plaintext health-only port;
- the Prometheus Operator resources (ServiceMonitor, PodMonitor) have the
  fields the operator requires, and their ports exist;
- the kustomizations list exactly the files that exist;
- cross references hold: Service selectors match pod labels, probes and
  service ports name container ports, the router finds engines through the
  engines' headless Service, grace periods cover the router's drain;
- the calibration ConfigMap equals engine/calibration/smollm2-135m-hybrid.json;
- the Grafana dashboard is valid JSON whose panels all have expressions.

usage: python3 scripts/check_deploy.py   (from the repository root)
"""
import copy
import glob
import json
import os
import subprocess
import sys
import tempfile

import yaml

BASE = "deploy/k8s/base"
OVERLAY = "deploy/k8s/overlays/cpu"
TLS_OVERLAY = "deploy/k8s/overlays/tls"
K8S_VERSION = "1.30.0"
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
failures = []


def fail(msg):
    failures.append(msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def validate(docs, label):
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(docs):
            p = os.path.join(tmp, f"{i}-{d['kind']}.yaml")
            with open(p, "w") as f:
                yaml.safe_dump(d, f)
            files.append(p)
        r = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", K8S_VERSION, *files],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            fail(f"{label}: kubernetes-validate failed:\n{r.stdout}{r.stderr}")


def json_pointer_apply(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                fail(f"overlay patch test failed at {op['path']}: {value!r} is not {op['value']!r}")
        elif op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            elif last in parent:
                del parent[last]
            else:
                fail(f"overlay patch removes missing path {op['path']}")
        elif op["op"] in ("replace", "add"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                else:
                    parent.insert(int(last), op["value"])
            else:
                if op["op"] == "replace" and last not in parent:
                    fail(f"overlay patch replaces missing path {op['path']}")
                parent[last] = op["value"]
        else:
            fail(f"unsupported patch op {op['op']}")
    return doc


def apply_overlay(over, docs):
    """`docs` with the overlay's JSON patches applied to their targets."""
    patched = []
    for d in docs:
        for p in over.get("patches", []):
            t = p["target"]
            if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]:
                d = json_pointer_apply(d, yaml.safe_load(p["patch"]))
        patched.append(d)
    return patched


def main():
    kust = load(f"{BASE}/kustomization.yaml")[0]
    listed = set(kust["resources"])
    present = {os.path.basename(p) for p in glob.glob(f"{BASE}/*.yaml")} - {"kustomization.yaml"}
    if listed != present:
        fail(f"base kustomization lists {sorted(listed)} but the folder has {sorted(present)}")
    docs = []
    for name in sorted(present):
        docs.extend(load(f"{BASE}/{name}"))
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
    validate(builtin, "base")

    # Prometheus Operator resources.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])

    def pod_ports(labels):
        ports = set()
        for w in workloads:
            tl = w["spec"]["template"]["metadata"]["labels"]
            if all(tl.get(k) == v for k, v in labels.items()):
                for c in w["spec"]["template"]["spec"]["containers"]:
                    ports |= {p["name"] for p in c.get("ports", [])}
        return ports

    for m in by_kind.get("ServiceMonitor", []) + by_kind.get("PodMonitor", []):
        name = f"{m['kind']} {m['metadata'].get('name')}"
        if m.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{name}: apiVersion must be monitoring.coreos.com/v1")
        if not m["metadata"].get("name"):
            fail(f"{name}: metadata.name is required")
        sel = m.get("spec", {}).get("selector", {}).get("matchLabels")
        if not sel:
            fail(f"{name}: spec.selector.matchLabels is required")
            continue
        key = "endpoints" if m["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
        eps = m["spec"].get(key)
        if not eps:
            fail(f"{name}: spec.{key} must list at least one endpoint")
            continue
        if m["kind"] == "ServiceMonitor":
            targets = [s for s in services.values() if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
            if not targets:
                fail(f"{name}: no Service has labels {sel}")
            names = {p["name"] for s in targets for p in s["spec"]["ports"]}
        else:
            names = pod_ports(sel)
            if not names:
                fail(f"{name}: no pod template has labels {sel}")
        for ep in eps:
            if ep.get("port") not in names:
                fail(f"{name}: endpoint port {ep.get('port')!r} is not one of {sorted(names)}")

    # Cross references.
    for s in services.values():
        ports = pod_ports(s["spec"]["selector"])
        if not ports:
            fail(f"Service {s['metadata']['name']}: selector matches no pod template")
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in ports:
                fail(f"Service {s['metadata']['name']}: targetPort {p['targetPort']} is not a container port")
    engine_svc = services.get("heterospec-engine")
    if not engine_svc or engine_svc["spec"].get("clusterIP") != "None":
        fail("the engines need a headless Service named heterospec-engine")
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                g = c.get(probe, {}).get("grpc")
                if g and g["port"] not in ports.values():
                    fail(f"{w['metadata']['name']}: {probe} port {g['port']} is not a container port")
            args = dict(a[2:].split("=", 1) for a in c.get("args", []) if a.startswith("--") and "=" in a)
            if "engine-dns" in args:
                host, port = args["engine-dns"].rsplit(":", 1)
                if host != "heterospec-engine" or int(port) != next(p["port"] for p in engine_svc["spec"]["ports"] if p["name"] == "grpc"):
                    fail(f"router --engine-dns={args['engine-dns']} does not name the engines' Service and gRPC port")
                drain = int(args.get("drain-timeout-secs", 30))
                if spec.get("terminationGracePeriodSeconds", 30) < drain + 5:
                    fail("the router's terminationGracePeriodSeconds must exceed its drain timeout plus 5 s")
    sts = by_kind["StatefulSet"][0]
    router = next(w for w in workloads if w["kind"] == "Deployment")
    engine_args = dict(
        a[2:].split("=", 1) for a in sts["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--") and "=" in a
    )
    surge = router["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 1)
    routers_at_once = router["spec"]["replicas"] + (surge if isinstance(surge, int) else 1)
    if int(engine_args.get("max-routers", 1)) < routers_at_once:
        fail(f"engines allow --max-routers={engine_args.get('max-routers', 1)}, but up to {routers_at_once} routers run at once (replicas + maxSurge)")
    if sts["spec"]["serviceName"] != "heterospec-engine":
        fail("the engine StatefulSet must use the headless Service")
    if sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") != 1:
        fail("base engines ask for one GPU each")
    # Images (kustomize `images`, applied the way kustomize does: by name,
    # base first, then the overlay) and the engines' device.
    def image_of(container, *image_lists):
        name, tag = container["image"], None
        for images in image_lists:
            for i in images:
                if i["name"] == name:
                    name, tag = i.get("newName", name), i.get("newTag", tag)
        return f"{name}:{tag}"

    def env_of(container, key):
        return next((e.get("value") for e in container.get("env", []) if e["name"] == key), None)

    engine_c = sts["spec"]["template"]["spec"]["containers"][0]
    router_c = router["spec"]["template"]["spec"]["containers"][0]
    if image_of(engine_c, kust["images"]) != "heterospec:cuda" or env_of(engine_c, "HETEROSPEC_DEVICE") != "cuda":
        fail("base engines run the GPU image (heterospec:cuda) with HETEROSPEC_DEVICE=cuda")
    if image_of(router_c, kust["images"]) != "heterospec:cpu":
        fail("the router runs the CPU image")
    if not os.path.exists("deploy/Dockerfile.cuda"):
        fail("the GPU image needs deploy/Dockerfile.cuda")

    # Calibration ConfigMap == committed calibration file.
    cm = next(d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == "heterospec-calibration")
    with open("engine/calibration/smollm2-135m-hybrid.json") as f:
        if json.loads(cm["data"]["calibration.json"]) != json.load(f):
            fail("the calibration ConfigMap differs from engine/calibration/smollm2-135m-hybrid.json")

    # CPU overlay: patches apply, result validates, no GPU left.
    over = load(f"{OVERLAY}/kustomization.yaml")[0]
    if over["resources"] != ["../../base"]:
        fail("the CPU overlay must build on ../../base")
    patched = apply_overlay(over, builtin)
    validate(patched, "cpu overlay")
    cpu_sts = next(d for d in patched if d["kind"] == "StatefulSet")
    c = cpu_sts["spec"]["template"]["spec"]["containers"][0]
    if "nvidia.com/gpu" in c["resources"].get("limits", {}):
        fail("the CPU overlay still asks for a GPU")
    if not any(a.startswith("--threads=") for a in c["args"]):
        fail("the CPU overlay sets no --threads")
    if env_of(c, "HETEROSPEC_DEVICE") != "cpu":
        fail("the CPU overlay's engines must run with HETEROSPEC_DEVICE=cpu")
    # Base images, then the overlay's: the overlay sees the base's result.
    resolved = image_of(c, kust["images"])
    name, _ = resolved.split(":")
    tag = next((i.get("newTag") for i in over.get("images", []) if i["name"] == name), resolved.split(":")[1])
    if f"{name}:{tag}" != "heterospec:cpu":
        fail(f"the CPU overlay's engines run {name}:{tag}, not the CPU image")

    # TLS overlay: patches apply, result validates; every workload mounts
    # the Secret, takes TLS flags, and probes a plaintext health-only port
    # that is one of its container ports and its --health-listen.
    tls_over = load(f"{TLS_OVERLAY}/kustomization.yaml")[0]
    if tls_over["resources"] != ["../../base"]:
        fail("the TLS overlay must build on ../../base")
    tls_patched = apply_overlay(tls_over, builtin)
    validate(tls_patched, "tls overlay")
    for d in tls_patched:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        name = d["metadata"]["name"]
        if not any(v.get("secret", {}).get("secretName") == "heterospec-tls" for v in spec.get("volumes", [])):
            fail(f"TLS overlay: {name} does not mount the heterospec-tls Secret")
        if not any(a.startswith("--tls-cert=") for a in c["args"]):
            fail(f"TLS overlay: {name} serves without --tls-cert")
        if any(a.startswith("--http-listen") for a in c["args"]) or any(p.get("name") == "http" for p in c["ports"]):
            fail(f"TLS overlay: {name} still serves plaintext HTTP (--http-listen)")
        listen = [a.split(":")[-1] for a in c["args"] if a.startswith("--health-listen=")]
        ports = {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                port = c[probe]["grpc"]["port"]
                if port not in ports or [str(port)] != listen:
                    fail(f"TLS overlay: {name} {probe} port {port} is not its --health-listen container port")
    for d in tls_patched:
        ports = d["spec"].get("ports", []) if d["kind"] == "Service" else [
            p for rule in d["spec"].get("ingress", []) for p in rule.get("ports", [])
        ] if d["kind"] == "NetworkPolicy" else []
        if any(p.get("port") == 8000 or p.get("name") == "http" for p in ports):
            fail(f"TLS overlay: {d['kind']} {d['metadata']['name']} still opens the plaintext HTTP port")
    router = next(d for d in tls_patched if d["kind"] == "Deployment")
    if not any(a.startswith("--engine-tls-ca=") for a in router["spec"]["template"]["spec"]["containers"][0]["args"]):
        fail("TLS overlay: the router does not talk TLS to engines")

    # Grafana dashboard.
    with open("deploy/grafana/heterospec-dashboard.json") as f:
        dash = json.load(f)
    for p in dash["panels"]:
        if p["type"] != "row" and not all(t.get("expr") for t in p.get("targets", [])) or (p["type"] != "row" and not p.get("targets")):
            fail(f"dashboard panel {p.get('title')!r} has no expression")

    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print(f"deploy files OK: {len(docs)} base manifests, CPU and TLS overlays, dashboard with {len(dash['panels'])} panels")


if __name__ == "__main__":
    main()
