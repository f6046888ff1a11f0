#!/usr/bin/env python3
"""Checks what deploy/ and the Dockerfile promise, on a machine without a
container engine or a Kubernetes cluster (CI runs it from .ci/run):

- the Dockerfile passes hadolint;
- deploy/compose/compose.yaml parses under the Compose specification
  (the compose-spec package), deploy/kubernetes/*.yaml validate against the
  Kubernetes schemas (kubernetes-validate, strict), and the KEDA resources
  against deploy/kubernetes/schemas/ (written from KEDA's documentation);
- and that they fit conveyor: the ConfigMap's and compose's TOML pass
  `conveyor config check` with every CONVEYOR__ variable the files set
  (so each is a real configuration key); every image entrypoint/command is
  a real subcommand; probe ports are the configured listen ports;
  terminationGracePeriodSeconds exceeds every drain_timeout_ms; KEDA scales
  the processors' group on their input and retry topics, with
  maxReplicaCount no higher than the partition count; and, with --brokers
  (a plaintext broker), a worker and a gateway started from the ConfigMap's
  configuration serve every probe path the manifests use.

Usage: deploy/check.py --conveyor target/debug/conveyor [--brokers HOST:PORT]
Ends with "deploy: N passed, M failed"; exit status 1 if any failed.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"

passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"deploy-check: ok   {name}")
    else:
        failed += 1
        print(f"deploy-check: FAIL {name}: {detail}")


def run(args, env=None, timeout=60):
    return subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=timeout
    )


def k8s_documents():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def conveyor_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR")}
    env.update(extra)
    return env


def config_check(conveyor, toml_text, env_vars, name):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml_text)
        path = f.name
    try:
        out = run([conveyor, "config", "check", "--config", path], env=conveyor_env(env_vars))
        check(
            f"{name}: `conveyor config check` with {sorted(env_vars)}",
            out.returncode == 0,
            out.stderr.strip(),
        )
        return tomllib.loads(toml_text)
    finally:
        os.unlink(path)


def subcommand_ok(conveyor, args, where):
    # `--help` after the arguments: clap checks every argument given and
    # then prints the help instead of running.
    out = run([conveyor, *args, "--help"])
    check(f"{where}: `conveyor {' '.join(args)}` is a real subcommand", out.returncode == 0, out.stderr.strip())


def static_checks(conveyor):
    # hadolint
    out = run(["hadolint", str(ROOT / "Dockerfile")])
    check("Dockerfile passes hadolint", out.returncode == 0, out.stdout + out.stderr)
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    cmd = next(json.loads(l.split(None, 1)[1]) for l in dockerfile if l.startswith("CMD "))
    entry = next(json.loads(l.split(None, 1)[1]) for l in dockerfile if l.startswith("ENTRYPOINT "))
    check("Dockerfile: the entrypoint is the conveyor binary", entry == ["/usr/local/bin/conveyor"], str(entry))
    subcommand_ok(conveyor, cmd, "Dockerfile CMD")

    # Compose
    import compose_spec

    compose_text = (COMPOSE / "compose.yaml").read_text()
    try:
        compose_spec.PyCompose.from_yaml(compose_text)
        check("compose.yaml follows the Compose specification", True)
    except Exception as e:  # noqa: BLE001 - report whatever it says
        check("compose.yaml follows the Compose specification", False, str(e))
    compose = yaml.safe_load(compose_text)
    env_vars = {}
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("conveyor"):
            subcommand_ok(conveyor, service["command"], f"compose service {name}")
            for key, value in service.get("environment", {}).items():
                if key.startswith("CONVEYOR__"):
                    env_vars[key] = str(value)
    config_check(conveyor, (COMPOSE / "conveyor.toml").read_text(), env_vars, "compose conveyor.toml")
    gateway = compose["services"]["gateway"]
    compose_toml = tomllib.loads((COMPOSE / "conveyor.toml").read_text())
    store_dir = str(Path(compose_toml.get("gateway", {}).get("store_path", "")).parent)
    named = {v.split(":")[0] for v in gateway.get("volumes", []) if v.split(":")[1:2] == [store_dir]}
    check(
        f"compose gateway: the status store's directory {store_dir} is a named volume",
        bool(named) and named <= set(compose.get("volumes") or {}),
        str(gateway.get("volumes")),
    )
    workers = compose["services"]["worker"]
    check("compose runs two workers", workers.get("deploy", {}).get("replicas") == 2)

    # Kubernetes
    docs = k8s_documents()
    core = [p for p, d in docs if not d["apiVersion"].startswith(("keda.sh/", "kustomize."))]
    core = sorted(set(core))
    out = run(["kubernetes-validate", "--strict", "--quiet", *map(str, core)], timeout=300)
    check("Kubernetes manifests validate (strict)", out.returncode == 0, out.stdout + out.stderr)
    schemas = {
        "ScaledObject": json.loads((K8S / "schemas" / "keda-scaledobject.json").read_text()),
        "TriggerAuthentication": json.loads((K8S / "schemas" / "keda-triggerauthentication.json").read_text()),
    }
    for path, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            try:
                jsonschema.validate(doc, schemas[doc["kind"]])
                check(f"{path.name}: {doc['kind']} matches its schema", True)
            except (jsonschema.ValidationError, KeyError) as e:
                check(f"{path.name}: {doc['kind']} matches its schema", False, str(e))

    configmap = next(d for _, d in docs if d["kind"] == "ConfigMap")
    toml_text = configmap["data"]["conveyor.toml"]
    k8s_env = {}
    for _, doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            subcommand_ok(conveyor, c["args"], f"{doc['kind']} {doc['metadata']['name']}")
            for e in c.get("env", []):
                if e["name"].startswith("CONVEYOR__"):
                    k8s_env[e["name"]] = e.get("value", "from-a-secret")
    config = config_check(conveyor, toml_text, k8s_env, "ConfigMap conveyor.toml")

    metrics_port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    gateway_port = int(config["gateway"]["listen"].rsplit(":", 1)[1])
    drains = [p.get("drain_timeout_ms", 5000) for p in config.get("processors", [])]
    probes = []
    for _, doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if component == "gateway":
            store_dir = str(Path(config["gateway"].get("store_path", "")).parent)
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
            check(
                f"gateway: the status store's directory {store_dir} is a mounted claim",
                config["gateway"].get("store_path", "") != "" and mounts.get(store_dir) in claims,
                f"mounts {mounts}, claims {sorted(claims)}",
            )
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        want = metrics_port if component == "worker" else gateway_port
        for kind in ("livenessProbe", "readinessProbe"):
            probe = container[kind]["httpGet"]
            port = ports.get(probe["port"], probe["port"])
            check(f"{component} {kind} port {port} is the configured listen port {want}", port == want)
            probes.append((component, probe["path"]))
        grace = pod["terminationGracePeriodSeconds"]
        check(
            f"{component}: terminationGracePeriodSeconds {grace} exceeds drain_timeout_ms {max(drains)}",
            grace * 1000 > max(drains),
        )
        if component == "worker":
            check("worker Deployment leaves replicas to KEDA", "replicas" not in doc["spec"])
            annotations = doc["spec"]["template"]["metadata"]["annotations"]
            check("worker scrape annotation names the metrics port", annotations.get("prometheus.io/port") == str(metrics_port))

    scaled = next(d for _, d in docs if d["kind"] == "ScaledObject")
    groups = {p.get("group_id", f"conveyor.{p['name']}") for p in config["processors"]}
    prefix = config.get("topics", {}).get("task_prefix", "conveyor.tasks.")
    inputs = set()
    for p in config["processors"]:
        for t in p.get("input_topics") or [prefix + k for k in p.get("tasks", {})]:
            inputs.add(t)
            inputs.add(t + p.get("retry_topic_suffix", ".retry"))
    partitions = config.get("topics", {}).get("partitions", 8)
    for trigger in scaled["spec"]["triggers"]:
        m = trigger["metadata"]
        check(f"KEDA trigger group {m['consumerGroup']} is a processor's group", m["consumerGroup"] in groups)
        check(f"KEDA trigger topic {m['topic']} is an input or retry topic", m["topic"] in inputs)
        check(f"KEDA trigger {m['topic']}: offsetResetPolicy earliest, as the workers", m.get("offsetResetPolicy") == "earliest")
        check(f"KEDA trigger {m['topic']} bootstraps where conveyor does", m["bootstrapServers"] == config["kafka"]["brokers"])
    check(
        f"KEDA maxReplicaCount {scaled['spec']['maxReplicaCount']} <= partitions {partitions}",
        scaled["spec"]["maxReplicaCount"] <= partitions,
    )
    return toml_text, probes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def probe_checks(conveyor, toml_text, probes, brokers):
    """Starts a worker and a gateway from the ConfigMap's configuration (on
    a plaintext test broker, on free ports) and asks every probe path."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "conveyor.toml"
        config.write_text(toml_text)
        ports = {"worker": free_port(), "gateway": free_port()}
        env = conveyor_env({
            "CONVEYOR__KAFKA__BROKERS": brokers,
            "CONVEYOR__KAFKA__SECURITY__PROTOCOL": "plaintext",
            "CONVEYOR__KAFKA__SECURITY__SASL_MECHANISM": "",
            "CONVEYOR__TOPICS__REPLICATION_FACTOR": "1",
            "CONVEYOR__METRICS__LISTEN": f"127.0.0.1:{ports['worker']}",
            "CONVEYOR__GATEWAY__LISTEN": f"127.0.0.1:{ports['gateway']}",
            "CONVEYOR__GATEWAY__STORE_PATH": str(Path(tmp) / "gateway.db"),
        })
        # An empty sasl_mechanism is not a mechanism: leave it out instead.
        env.pop("CONVEYOR__KAFKA__SECURITY__SASL_MECHANISM")
        text = toml_text.replace('sasl_mechanism = "SCRAM-SHA-512"', "")
        config.write_text(text)
        out = run([conveyor, "topics", "create", "--config", str(config)], env=env, timeout=120)
        check("ConfigMap configuration: `conveyor topics create`", out.returncode == 0, out.stdout + out.stderr)
        children = {
            c: subprocess.Popen([conveyor, c, "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / f"{c}.log", "w"))
            for c in ("worker", "gateway")
        }
        try:
            for component, path in probes:
                url = f"http://127.0.0.1:{ports[component]}{path}"
                deadline = time.time() + 60
                status = get(url)
                while status != 200 and time.time() < deadline:
                    time.sleep(0.5)
                    status = get(url)
                log = (Path(tmp) / f"{component}.log").read_text()[-2000:]
                check(f"{component} serves {path} (200 once started)", status == 200, f"last status {status}; log: {log}")
        finally:
            for child in children.values():
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conveyor", required=True, help="path of the conveyor binary")
    parser.add_argument("--brokers", help="a plaintext broker (host:port) for the probe checks")
    args = parser.parse_args()
    toml_text, probes = static_checks(args.conveyor)
    if args.brokers:
        probe_checks(args.conveyor, toml_text, probes, args.brokers)
    else:
        print("deploy-check: no --brokers: the probe paths were not requested")
    print(f"deploy: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
