#!/usr/bin/env python3
"""Checks what deploy/ and the Dockerfile promise, on a machine without a
container engine or a Kubernetes cluster (CI runs it from .ci/run):

- validators: the Dockerfile passes hadolint; deploy/compose/compose.yaml
  parses under the Compose specification; deploy/kubernetes/*.yaml validate
  against the Kubernetes schemas (kubernetes-validate, strict) and the KEDA
  resources against deploy/kubernetes/schemas/; the Prometheus files pass
  `promtool` (a missing promtool fails);
- the configuration: the ConfigMap's and compose's TOML pass `conveyor
  config check`, whose *effective* configuration (defaults and derived
  values filled in) is what the other checks read; the files a
  configuration names (password_file, auth_tokens_file, ca_file) lie on
  mounted Secrets; nothing secret sits in a ConfigMap or the environment;
  listen addresses are not loopback;
- cross-object references: Secret names and keys, the config mount against
  `--config`, `scaleTargetRef`, the PDB's and Services' selectors, the
  StatefulSet's Service, image names against the kustomization;
- Pod Security "restricted" (and more: read-only root, no service account
  token, no hard-coded uid, requests and limits) on every pod, the init
  containers included;
- budgets: each pod's terminationGracePeriodSeconds against its shutdown
  (drain + commit + flush + margin; shutdown delay for the gateway), the
  drain against the slowest handler, memory requests against conveyor's
  own bounds (prefetch, in-flight bytes, status view and store) — printed;
- topics provisioned on every rollout (init containers) and waited for;
  KEDA's single summed trigger, its threshold against the workers'
  concurrency, scale-down policy, persistent lag, the PDB's eviction
  policy; the Dockerfile's COPY destination is its ENTRYPOINT;
- and, with --brokers (a plaintext broker), a worker and a gateway started
  from the ConfigMap's configuration serve every probe path the manifests
  use.

`--self-test` runs the checks on broken copies of the files, one breakage
at a time, and shows that each is caught (the list it prints).

Usage: deploy/check.py --conveyor target/debug/conveyor [--brokers HOST:PORT]
       deploy/check.py --conveyor target/debug/conveyor --self-test
Ends with "deploy: N passed, M failed"; exit status 1 if any failed.
"""

import argparse
import copy
import json
import os
import re
import shutil
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

SOURCE = Path(__file__).resolve().parent.parent

# What a pod's shutdown takes besides its drain (seconds), from the code:
# the final synchronous commit (allowed 5 s here; librdkafka bounds it by
# its socket timeout), the producer's flush (processor/mod.rs and
# gateway/mod.rs: 5 s), and a margin for the process to exit.
COMMIT_S = 5
FLUSH_S = 5
MARGIN_S = 5
# Memory conveyor needs besides its bounded buffers: the process, its
# runtime, librdkafka's threads and metadata (measured idle RSS ~50-60 MiB,
# BENCHMARKS.md), rounded up.
BASE_MIB = 64
# The status store's page caches: 2 MiB for each of its 9 connections
# plus SQLite's 16 MiB soft heap limit (gateway/store.rs).
STORE_CACHE_MIB = 34
MIB = 1024 * 1024


class Checker:
    def __init__(self, root, conveyor, quiet=False):
        self.root = Path(root)
        self.deploy = self.root / "deploy"
        self.k8s = self.deploy / "kubernetes"
        self.compose_dir = self.deploy / "compose"
        self.conveyor = conveyor
        self.quiet = quiet
        self.passed = 0
        self.failures = []

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            if not self.quiet:
                print(f"deploy-check: ok   {name}")
        else:
            self.failures.append(name)
            if not self.quiet:
                print(f"deploy-check: FAIL {name}: {detail}")

    def note(self, line):
        if not self.quiet:
            print(f"deploy-check: {line}")

    # -- helpers -------------------------------------------------------

    def documents(self):
        docs = []
        for path in sorted(self.k8s.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    docs.append((path, doc))
        return docs

    def effective(self, toml_text, env_vars, name, files):
        """`conveyor config check`'s effective configuration of
        `toml_text`, with the secret files it names (`files`: path in the
        pod -> content) stood in for by temporary ones."""
        with tempfile.TemporaryDirectory() as tmp:
            text = toml_text
            for i, (path, content) in enumerate(sorted(files.items())):
                stand_in = Path(tmp) / f"file{i}"
                stand_in.write_text(content)
                text = text.replace(f'"{path}"', json.dumps(str(stand_in)))
            config = Path(tmp) / "conveyor.toml"
            config.write_text(text)
            out = run([self.conveyor, "config", "check", "--config", str(config)], env=conveyor_env(env_vars))
        self.check(f"{name}: `conveyor config check` with {sorted(env_vars)}", out.returncode == 0, out.stderr.strip())
        for line in out.stderr.splitlines():
            if line.startswith("warning:"):
                self.check(f"{name}: no configuration warning", False, line)
        if out.returncode != 0:
            return tomllib.loads(toml_text)
        return tomllib.loads(out.stdout)

    def subcommand_ok(self, args, where):
        # `--help` after the arguments: clap checks every argument given and
        # then prints the help instead of running.
        out = run([self.conveyor, *args, "--help"])
        self.check(f"{where}: `conveyor {' '.join(args)}` is a real subcommand", out.returncode == 0, out.stderr.strip())

    # -- validators ----------------------------------------------------

    def validators(self):
        out = run(["hadolint", str(self.root / "Dockerfile")])
        self.check("Dockerfile passes hadolint", out.returncode == 0, out.stdout + out.stderr)
        import compose_spec

        try:
            compose_spec.PyCompose.from_yaml((self.compose_dir / "compose.yaml").read_text())
            self.check("compose.yaml follows the Compose specification", True)
        except Exception as e:  # noqa: BLE001 - report whatever it says
            self.check("compose.yaml follows the Compose specification", False, str(e))
        docs = self.documents()
        core = sorted({str(p) for p, d in docs if not d["apiVersion"].startswith(("keda.sh/", "kustomize."))})
        out = run(["kubernetes-validate", "--strict", "--quiet", *core], timeout=300)
        self.check("Kubernetes manifests validate (strict)", out.returncode == 0, out.stdout + out.stderr)
        self.promtool()

    def promtool(self):
        if shutil.which("promtool") is None:
            self.check("promtool is installed (the Prometheus files are checked)", False, "promtool not found on PATH")
            return
        out = run(["promtool", "check", "config", str(self.deploy / "prometheus" / "prometheus.yml")])
        self.check("prometheus.yml and its rules pass promtool", out.returncode == 0, out.stdout + out.stderr)
        out = run(["promtool", "check", "rules", str(self.deploy / "prometheus" / "alerts.yml")])
        self.check("alerts.yml passes promtool", out.returncode == 0, out.stdout + out.stderr)

    # -- the image -----------------------------------------------------

    def dockerfile(self):
        lines = (self.root / "Dockerfile").read_text().splitlines()
        cmd = next(json.loads(l.split(None, 1)[1]) for l in lines if l.startswith("CMD "))
        entry = next(json.loads(l.split(None, 1)[1]) for l in lines if l.startswith("ENTRYPOINT "))
        self.subcommand_ok(cmd, "Dockerfile CMD")
        # The last stage's COPY of the binary must land where ENTRYPOINT runs.
        last = max(i for i, l in enumerate(lines) if l.startswith("FROM "))
        copies = [l.split()[-1] for l in lines[last:] if l.startswith("COPY ") and "--from=" in l]
        self.check(
            f"Dockerfile: ENTRYPOINT {entry[0]} is where the binary is copied",
            bool(entry) and entry[0] in copies,
            f"COPY --from destinations {copies}",
        )
        labels = " ".join(l for l in lines if "org.opencontainers.image." in l)
        self.check("Dockerfile: OCI source label", "org.opencontainers.image.source" in labels)

    # -- configuration ---------------------------------------------------

    def secret_files(self, config_text):
        """The files a configuration names that come from Secrets."""
        config = tomllib.loads(config_text)
        found = {}
        security = config.get("kafka", {}).get("security", {})
        for key in ("password_file", "ca_file"):
            if security.get(key):
                found[f"kafka.security.{key}"] = security[key]
        gateway = config.get("gateway", {})
        if gateway.get("auth_tokens_file"):
            found["gateway.auth_tokens_file"] = gateway["auth_tokens_file"]
        return found

    def no_loopback(self, config, where):
        for key in ("metrics", "gateway"):
            listen = config.get(key, {}).get("listen", "")
            host = listen.rsplit(":", 1)[0].strip("[]")
            self.check(
                f"{where}: {key}.listen {listen} is reachable from outside the container",
                host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."),
                "kubelet probes and Prometheus connect to the pod's address, not loopback",
            )

    # -- compose ---------------------------------------------------------

    def compose(self):
        compose = yaml.safe_load((self.compose_dir / "compose.yaml").read_text())
        env_vars = {}
        for name, service in compose["services"].items():
            if service.get("image", "").startswith("conveyor"):
                self.subcommand_ok(service["command"], f"compose service {name}")
                for key, value in (service.get("environment") or {}).items():
                    if key.startswith("CONVEYOR__"):
                        env_vars[key] = str(value)
        text = (self.compose_dir / "conveyor.toml").read_text()
        config = self.effective(text, env_vars, "compose conveyor.toml", {})
        self.no_loopback(config, "compose")
        gateway = compose["services"]["gateway"]
        store_dir = str(Path(config.get("gateway", {}).get("store_path", "")).parent)
        named = {v.split(":")[0] for v in gateway.get("volumes", []) if v.split(":")[1:2] == [store_dir]}
        self.check(
            f"compose gateway: the status store's directory {store_dir} is a named volume",
            bool(named) and named <= set(compose.get("volumes") or {}),
            str(gateway.get("volumes")),
        )
        self.check("compose runs two workers", compose["services"]["worker"].get("deploy", {}).get("replicas") == 2)
        topics = compose["services"].get("topics", {})
        self.check(
            "compose: a topics service creates the topics on every `up`",
            topics.get("command", [])[:2] == ["topics", "create"],
            str(topics.get("command")),
        )
        for name in ("worker", "gateway"):
            wait = compose["services"][name].get("depends_on", {}).get("topics", {})
            self.check(
                f"compose {name} starts once the topics exist",
                wait.get("condition") == "service_completed_successfully",
                str(wait),
            )
        drains = [p.get("drain_timeout_ms", 5000) for p in config.get("processors", [])]
        grace = parse_seconds(compose["services"]["worker"].get("stop_grace_period", "10s"))
        need = max(drains, default=0) / 1000 + COMMIT_S + FLUSH_S + MARGIN_S
        self.note(f"budget compose worker: drain {max(drains, default=0) / 1000:.0f} s + commit {COMMIT_S} + flush {FLUSH_S} + margin {MARGIN_S} = {need:.0f} s; stop_grace_period {grace:.0f} s")
        self.check(f"compose worker: stop_grace_period {grace:.0f} s covers the shutdown ({need:.0f} s)", grace >= need)

    # -- Kubernetes ------------------------------------------------------

    def kubernetes(self):
        docs = self.documents()
        by_kind = {}
        for _, d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        schemas = {
            "ScaledObject": json.loads((self.k8s / "schemas" / "keda-scaledobject.json").read_text()),
            "TriggerAuthentication": json.loads((self.k8s / "schemas" / "keda-triggerauthentication.json").read_text()),
        }
        for path, doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                try:
                    jsonschema.validate(doc, schemas[doc["kind"]])
                    self.check(f"{path.name}: {doc['kind']} matches its schema", True)
                except (jsonschema.ValidationError, KeyError) as e:
                    self.check(f"{path.name}: {doc['kind']} matches its schema", False, str(e).splitlines()[0])

        secrets = {}
        example = self.k8s / "secret.example.yaml"
        for doc in yaml.safe_load_all(example.read_text()):
            if doc and doc.get("kind") == "Secret":
                keys = set((doc.get("stringData") or {}).keys()) | set((doc.get("data") or {}).keys())
                secrets[doc["metadata"]["name"]] = keys
        configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
        configmap = next(iter(configmaps.values()))
        toml_text = configmap["data"]["conveyor.toml"]
        self.check(
            "ConfigMap: no secret in the configuration (password, auth_tokens, client_key_password)",
            not re.search(r"^\s*(password|auth_tokens|client_key_password|client_secret)\s*=", toml_text, re.M),
            "put it in a Secret and point a *_file key at it",
        )

        workloads = [d for d in docs if d[1]["kind"] in ("Deployment", "StatefulSet", "Job")]
        env_vars = {}
        for _, doc in workloads:
            for c in containers(doc):
                for e in c.get("env", []):
                    if e["name"].startswith("CONVEYOR__"):
                        env_vars[e["name"]] = e.get("value", "from-a-secret")
                    self.check(
                        f"{doc['metadata']['name']}/{c['name']}: env {e['name']} holds no secret",
                        "secretKeyRef" not in (e.get("valueFrom") or {}),
                        "mount the Secret as a file instead (password_file, auth_tokens_file)",
                    )
        files = self.secret_files(toml_text)
        stand_ins = {path: ("a-stand-in-token-for-checks\n" if key.endswith("tokens_file") else "stand-in\n") for key, path in files.items()}
        config = self.effective(toml_text, env_vars, "ConfigMap conveyor.toml", stand_ins)
        self.no_loopback(config, "ConfigMap")

        kustomization = yaml.safe_load((self.k8s / "kustomization.yaml").read_text())
        resources = set(kustomization.get("resources", []))
        for path, _ in docs:
            if path.name not in ("kustomization.yaml", "secret.example.yaml"):
                self.check(f"kustomization lists {path.name}", path.name in resources)
        image_names = {i["name"] for i in kustomization.get("images", [])}

        metrics_port = port_of(config["metrics"]["listen"])
        gateway_port = port_of(config["gateway"]["listen"])
        probes = []
        for path, doc in workloads:
            name = doc["metadata"]["name"]
            pod = doc["spec"]["template"]["spec"]
            self.restricted(name, pod)
            for c in containers(doc):
                image = c.get("image", "")
                self.check(f"{name}/{c['name']}: image {image} names a registry", has_registry(image), "a bare name cannot be pulled")
                self.check(f"{name}/{c['name']}: image is in the kustomization's images", image.rsplit(":", 1)[0].split("@")[0] in image_names, str(sorted(image_names)))
                self.subcommand_ok(c["args"], f"{name}/{c['name']}")
                claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
                self.mounts(name, c, pod, secrets, configmaps, files, claims)
            if doc["kind"] == "Job":
                continue
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            self.check(f"{name}: selector matches its pods", subset(doc["spec"]["selector"]["matchLabels"], labels))
            container = pod["containers"][0]
            inits = [i["args"][:2] for i in pod.get("initContainers", [])]
            want_init = ["topics", "create"] if component == "worker" else ["topics", "check"]
            self.check(
                f"{name}: an init container runs `conveyor {' '.join(want_init)}` on every rollout",
                want_init in inits,
                str(inits),
            )
            if component == "gateway":
                waits = [i["args"] for i in pod.get("initContainers", []) if i["args"][:2] == ["topics", "check"]]
                self.check(f"{name}: its topics check waits (--wait)", any("--wait" in a for a in waits), str(waits))
                store_dir = str(Path(config["gateway"].get("store_path", "")).parent)
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
                self.check(
                    f"gateway: the status store's directory {store_dir} is a mounted claim",
                    config["gateway"].get("store_path", "") != "" and mounts.get(store_dir) in claims,
                    f"mounts {mounts}, claims {sorted(claims)}",
                )
                services = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == doc["spec"].get("serviceName")]
                self.check(
                    f"{name}: serviceName names a headless Service selecting its pods",
                    bool(services) and services[0]["spec"].get("clusterIP") == "None" and subset(services[0]["spec"]["selector"], labels),
                )
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            want = metrics_port if component == "worker" else gateway_port
            for kind in ("livenessProbe", "readinessProbe"):
                probe = container[kind]["httpGet"]
                port = ports.get(probe["port"], probe["port"])
                self.check(f"{component} {kind} port {port} is the configured listen port {want}", port == want)
                probes.append((component, probe["path"]))
            self.budgets(component, name, pod, container, config)
            if component == "worker":
                self.check("worker Deployment leaves replicas to KEDA", "replicas" not in doc["spec"])
                annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
                self.check("worker scrape annotation names the metrics port", annotations.get("prometheus.io/port") == str(metrics_port))
                workers = (name, labels)

        for service in by_kind.get("Service", []):
            targets = [d for _, d in workloads if d["kind"] != "Job" and subset(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
            self.check(f"Service {service['metadata']['name']} selects pods", bool(targets))
        for pdb in by_kind.get("PodDisruptionBudget", []):
            self.check(f"PDB {pdb['metadata']['name']} selects the workers", subset(pdb["spec"]["selector"]["matchLabels"], workers[1]))
            self.check(
                f"PDB {pdb['metadata']['name']}: unready pods may be evicted (unhealthyPodEvictionPolicy AlwaysAllow)",
                pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow",
                "otherwise one unready worker blocks every node drain",
            )
        self.keda(by_kind, config, workers[0], secrets)
        return toml_text, probes

    def restricted(self, name, pod):
        """Pod Security "restricted", and this project's stricter habits."""
        sc = pod.get("securityContext", {})
        everyone = pod.get("initContainers", []) + pod.get("containers", [])
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        self.check(
            f"{name}: seccompProfile RuntimeDefault",
            seccomp in ("RuntimeDefault", "Localhost")
            or all((c.get("securityContext", {}).get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost") for c in everyone),
        )
        self.check(
            f"{name}: runAsNonRoot",
            sc.get("runAsNonRoot") is True or all(c.get("securityContext", {}).get("runAsNonRoot") is True for c in everyone),
        )
        self.check(f"{name}: no hard-coded runAsUser (the image's user)", "runAsUser" not in sc and all("runAsUser" not in c.get("securityContext", {}) for c in everyone))
        self.check(f"{name}: automountServiceAccountToken false", pod.get("automountServiceAccountToken") is False)
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            self.check(f"{name}: no {key}", not pod.get(key))
        self.check(f"{name}: no hostPath volume", all("hostPath" not in v for v in pod.get("volumes", [])))
        for c in everyone:
            csc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            self.check(f"{where}: allowPrivilegeEscalation false", csc.get("allowPrivilegeEscalation") is False)
            self.check(f"{where}: drops ALL capabilities", "ALL" in (csc.get("capabilities") or {}).get("drop", []))
            self.check(f"{where}: adds no capability", not (csc.get("capabilities") or {}).get("add"))
            self.check(f"{where}: not privileged", not csc.get("privileged"))
            self.check(f"{where}: read-only root filesystem", csc.get("readOnlyRootFilesystem") is True)
            resources = c.get("resources", {})
            self.check(
                f"{where}: memory and cpu requested, memory limited",
                "memory" in resources.get("requests", {}) and "cpu" in resources.get("requests", {}) and "memory" in resources.get("limits", {}),
                str(resources),
            )

    def mounts(self, name, container, pod, secrets, configmaps, files, claims):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for m in container.get("volumeMounts", []):
            self.check(f"{name}/{container['name']}: volume {m['name']} is declared", m["name"] in volumes or m["name"] in claims)
        args = container.get("args", [])
        if "--config" in args:
            config_path = Path(args[args.index("--config") + 1])
            mount = mounts.get(str(config_path.parent))
            volume = volumes.get(mount["name"]) if mount else None
            cm = (volume or {}).get("configMap", {}).get("name")
            self.check(
                f"{name}/{container['name']}: --config {config_path} is the mounted ConfigMap's conveyor.toml",
                cm in configmaps and config_path.name in configmaps[cm].get("data", {}),
                f"mounts {sorted(mounts)}",
            )
        for v in volumes.values():
            if "secret" in v:
                secret = v["secret"]["secretName"]
                self.check(f"{name}: Secret {secret} exists (secret.example.yaml)", secret in secrets)
                for item in v["secret"].get("items", []):
                    self.check(f"{name}: Secret {secret} has the key {item['key']}", item["key"] in secrets.get(secret, set()))
        for key, path in files.items():
            path = Path(path)
            mount = mounts.get(str(path.parent))
            volume = volumes.get(mount["name"]) if mount else None
            secret = (volume or {}).get("secret")
            if key == "gateway.auth_tokens_file" and container["args"][:1] != ["gateway"]:
                continue
            items = {i["path"]: i["key"] for i in (secret or {}).get("items", [])}
            self.check(
                f"{name}/{container['name']}: {key} {path} is a file of a mounted Secret",
                secret is not None and (path.name in items or (not items and path.name in secrets.get(secret["secretName"], set()))),
                f"mounts {sorted(mounts)}",
            )

    def budgets(self, component, name, pod, container, config):
        grace = pod.get("terminationGracePeriodSeconds", 30)
        limits = container.get("resources", {})
        request = mebibytes(limits.get("requests", {}).get("memory", "0"))
        limit = mebibytes(limits.get("limits", {}).get("memory", "0"))
        prefetch = config["kafka"].get("prefetch_bytes", 64 * MIB) / MIB
        if component == "worker":
            processors = config.get("processors", [])
            drain = max((p.get("drain_timeout_ms", 5000) for p in processors), default=0) / 1000
            need = drain + COMMIT_S + FLUSH_S + MARGIN_S
            self.note(f"budget {name}: drain {drain:.0f} s + commit {COMMIT_S} + flush {FLUSH_S} + margin {MARGIN_S} = {need:.0f} s; terminationGracePeriodSeconds {grace}")
            self.check(f"{name}: terminationGracePeriodSeconds {grace} covers the shutdown ({need:.0f} s)", grace >= need)
            for i, p in enumerate(processors):
                slowest = max((t.get("timeout_ms", 30000) for t in p.get("tasks", {}).values()), default=0)
                self.check(
                    f"processors[{i}]: drain_timeout_ms {p.get('drain_timeout_ms', 5000)} >= the slowest handler's timeout_ms {slowest}",
                    p.get("drain_timeout_ms", 5000) >= slowest,
                )
            in_flight = sum(p.get("max_in_flight_bytes", 64 * MIB) for p in processors) / MIB
            memory = BASE_MIB + prefetch * max(1, len(processors)) + in_flight
            self.note(f"memory {name}: {BASE_MIB} MiB + prefetch {prefetch:.0f} MiB x {max(1, len(processors))} processor(s) + in-flight bytes {in_flight:.0f} MiB = {memory:.0f} MiB; requested {request:.0f}, limit {limit:.0f}")
        else:
            delay = config["gateway"].get("shutdown_delay_ms", 0) / 1000
            need = delay + 5 + FLUSH_S + MARGIN_S
            self.note(f"budget {name}: shutdown delay {delay:.0f} s + requests finishing 5 + flush {FLUSH_S} + margin {MARGIN_S} = {need:.0f} s; terminationGracePeriodSeconds {grace}")
            self.check(f"{name}: terminationGracePeriodSeconds {grace} covers the shutdown ({need:.0f} s)", grace >= need)
            self.check(f"{name}: gateway.shutdown_delay_ms set (no request refused during a rollout)", delay > 0)
            view = config["gateway"].get("view_max_bytes", 64 * MIB) / MIB
            memory = BASE_MIB + prefetch + view + STORE_CACHE_MIB
            self.note(f"memory {name}: {BASE_MIB} MiB + prefetch {prefetch:.0f} + view {view:.0f} + store caches {STORE_CACHE_MIB} = {memory:.0f} MiB; requested {request:.0f}, limit {limit:.0f}")
        self.check(f"{name}: memory request {request:.0f} MiB >= conveyor's bounds {memory:.0f} MiB", request >= memory)
        self.check(f"{name}: memory limit {limit:.0f} MiB >= its request", limit >= request)

    def keda(self, by_kind, config, worker_name, secrets):
        scaled = by_kind["ScaledObject"][0]
        spec = scaled["spec"]
        self.check(f"KEDA scales the worker Deployment ({worker_name})", spec["scaleTargetRef"]["name"] == worker_name)
        groups = {p.get("group_id") for p in config["processors"]}
        triggers = spec["triggers"]
        self.check(
            "KEDA: one trigger per consumer group, without `topic` (the lag of the task and retry topics summed)",
            len(triggers) == len({t["metadata"]["consumerGroup"] for t in triggers}) and all("topic" not in t["metadata"] for t in triggers),
            "two triggers take the larger lag, not the sum",
        )
        partitions = config.get("topics", {}).get("partitions", 8)
        for t in triggers:
            m = t["metadata"]
            group = m["consumerGroup"]
            self.check(f"KEDA trigger group {group} is a processor's group", group in groups)
            concurrency = sum(p.get("max_in_flight", 10000) for p in config["processors"] if p.get("group_id") == group)
            self.check(
                f"KEDA {group}: lagThreshold {m['lagThreshold']} >= the workers' concurrency {concurrency} (their in-flight work counts as lag)",
                int(m["lagThreshold"]) >= concurrency,
            )
            self.check(f"KEDA {group}: excludePersistentLag (one stuck task does not scale to the maximum)", m.get("excludePersistentLag") == "true")
            self.check(f"KEDA {group}: offsetResetPolicy earliest, as the workers", m.get("offsetResetPolicy") == "earliest")
            self.check(f"KEDA {group} bootstraps where conveyor does", m["bootstrapServers"] == config["kafka"]["brokers"])
            auth = next((a for a in by_kind.get("TriggerAuthentication", []) if a["metadata"]["name"] == t.get("authenticationRef", {}).get("name")), None)
            self.check(f"KEDA {group}: its TriggerAuthentication exists", auth is not None)
            if auth is not None:
                params = {r["parameter"]: r for r in auth["spec"].get("secretTargetRef", [])}
                for ref in params.values():
                    self.check(f"TriggerAuthentication: Secret {ref['name']} has the key {ref['key']}", ref["key"] in secrets.get(ref["name"], set()))
                if config["kafka"].get("security", {}).get("ca_file"):
                    self.check("TriggerAuthentication trusts the cluster's CA as conveyor does (ca)", "ca" in params)
        if spec.get("minReplicaCount", 0) >= 1:
            self.check(
                "KEDA: no activationLagThreshold/cooldownPeriod with minReplicaCount >= 1 (they only govern 0 <-> 1)",
                "cooldownPeriod" not in spec and all("activationLagThreshold" not in t["metadata"] for t in triggers),
            )
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        self.check("KEDA: a scale-down policy", bool(behavior.get("scaleDown", {}).get("policies")))
        self.check(f"KEDA maxReplicaCount {spec['maxReplicaCount']} <= partitions {partitions}", spec["maxReplicaCount"] <= partitions)

    def run_static(self, external=True):
        if external:
            self.validators()
        self.dockerfile()
        self.compose()
        return self.kubernetes()


def containers(doc):
    pod = doc["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod.get("containers", [])


def subset(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def has_registry(image):
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def mebibytes(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    for suffix, factor in units.items():
        if str(quantity).endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / MIB


def parse_seconds(text):
    match = re.fullmatch(r"(\d+)(s|m)", str(text))
    if not match:
        return 0
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def run(args, env=None, timeout=60):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def conveyor_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR")}
    env.update(extra)
    return env


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


def probe_checks(checker, toml_text, probes, brokers):
    """Starts a worker and a gateway from the ConfigMap's configuration (on
    a plaintext test broker, on free ports, secrets stood in for) and asks
    every probe path."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text("a-stand-in-token-for-checks\n")
        config = Path(tmp) / "conveyor.toml"
        # Plaintext on the test broker: no SASL, no TLS, no password file.
        text = re.sub(r"^\s*(sasl_mechanism|username|password_file|ca_file)\s*=.*$", "", toml_text, flags=re.M)
        text = text.replace('protocol = "sasl_ssl"', 'protocol = "plaintext"')
        text = re.sub(r'auth_tokens_file = ".*"', f"auth_tokens_file = {json.dumps(str(tokens))}", text)
        config.write_text(text)
        ports = {"worker": free_port(), "gateway": free_port()}
        env = conveyor_env({
            "CONVEYOR__KAFKA__BROKERS": brokers,
            "CONVEYOR__TOPICS__REPLICATION_FACTOR": "1",
            "CONVEYOR__METRICS__LISTEN": f"127.0.0.1:{ports['worker']}",
            "CONVEYOR__GATEWAY__LISTEN": f"127.0.0.1:{ports['gateway']}",
            "CONVEYOR__GATEWAY__STORE_PATH": str(Path(tmp) / "gateway.db"),
        })
        out = run([checker.conveyor, "topics", "create", "--config", str(config)], env=env, timeout=120)
        checker.check("ConfigMap configuration: `conveyor topics create`", out.returncode == 0, out.stdout + out.stderr)
        out = run([checker.conveyor, "topics", "check", "--wait", "30s", "--config", str(config)], env=env, timeout=120)
        checker.check("ConfigMap configuration: `conveyor topics check --wait` passes once they exist", out.returncode == 0, out.stdout + out.stderr)
        children = {
            c: subprocess.Popen([checker.conveyor, c, "--config", str(config)], env=env,
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
                checker.check(f"{component} serves {path} (200 once started)", status == 200, f"last status {status}; log: {log}")
        finally:
            for child in children.values():
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()


# -- self-test: each check shown failing on a broken copy ---------------


def edit_yaml(path, change):
    docs = [d for d in yaml.safe_load_all(path.read_text())]
    for doc in docs:
        if doc:
            change(doc)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def pod_of(kind, name=None):
    def pick(change):
        def apply(doc):
            if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name):
                change(doc)
        return apply
    return pick


def replace_text(path, old, new):
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


WORKER = pod_of("Deployment")
GATEWAY = pod_of("StatefulSet")


def breakages():
    """(what is broken, how, the check that must then fail)."""
    k8s = lambda root: root / "deploy" / "kubernetes"  # noqa: E731
    return [
        ("no seccompProfile on the worker pod",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile"))),
         "conveyor-worker: seccompProfile RuntimeDefault"),
        ("a hard-coded runAsUser",
         lambda r: edit_yaml(k8s(r) / "gateway.yaml", GATEWAY(lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=1000))),
         "conveyor-gateway: no hard-coded runAsUser"),
        ("an init container without resources",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["initContainers"][0].pop("resources"))),
         "conveyor-worker/topics: memory and cpu requested, memory limited"),
        ("a service account token mounted",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken"))),
         "conveyor-worker: automountServiceAccountToken false"),
        ("an image without a registry",
         lambda r: replace_text(k8s(r) / "worker.yaml", "image: registry.example.com/conveyor:0.1.0", "image: conveyor:0.1.0"),
         "names a registry"),
        ("a loopback metrics listener",
         lambda r: replace_text(k8s(r) / "configmap.yaml", 'listen = "0.0.0.0:9464"', 'listen = "127.0.0.1:9464"'),
         "ConfigMap: metrics.listen 127.0.0.1:9464 is reachable from outside the container"),
        ("a password in the ConfigMap",
         lambda r: replace_text(k8s(r) / "configmap.yaml", 'password_file = "/etc/conveyor-secrets/kafka/password"', 'password = "hunter2"'),
         "ConfigMap: no secret in the configuration"),
        ("a password through the environment",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
             {"name": "CONVEYOR__KAFKA__SECURITY__PASSWORD", "valueFrom": {"secretKeyRef": {"name": "conveyor-kafka", "key": "password"}}}))),
         "env CONVEYOR__KAFKA__SECURITY__PASSWORD holds no secret"),
        ("a Secret key that does not exist",
         lambda r: replace_text(k8s(r) / "worker.yaml", "- key: password\n", "- key: passwd\n"),
         "Secret conveyor-kafka has the key passwd"),
        ("password_file outside the mounted Secret",
         lambda r: replace_text(k8s(r) / "configmap.yaml", "/etc/conveyor-secrets/kafka/password", "/etc/conveyor-secrets/elsewhere/password"),
         "kafka.security.password_file /etc/conveyor-secrets/elsewhere/password is a file of a mounted Secret"),
        ("--config not where the ConfigMap is mounted",
         lambda r: replace_text(k8s(r) / "worker.yaml", '"worker", "--config", "/etc/conveyor/conveyor.toml"', '"worker", "--config", "/etc/config/conveyor.toml"'),
         "--config /etc/config/conveyor.toml is the mounted ConfigMap's conveyor.toml"),
        ("KEDA scaling another Deployment",
         lambda r: edit_yaml(k8s(r) / "keda.yaml", pod_of("ScaledObject")(lambda d: d["spec"]["scaleTargetRef"].update(name="conveyor-workers"))),
         "KEDA scales the worker Deployment"),
        ("a PDB selecting nothing",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", pod_of("PodDisruptionBudget")(lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "workers"}))),
         "PDB conveyor-worker selects the workers"),
        ("a PDB blocking drains on unready pods",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", pod_of("PodDisruptionBudget")(lambda d: d["spec"].pop("unhealthyPodEvictionPolicy"))),
         "unhealthyPodEvictionPolicy AlwaysAllow"),
        ("a grace period shorter than the shutdown",
         lambda r: replace_text(k8s(r) / "worker.yaml", "terminationGracePeriodSeconds: 50", "terminationGracePeriodSeconds: 30"),
         "conveyor-worker: terminationGracePeriodSeconds 30 covers the shutdown"),
        ("a drain shorter than the slowest handler",
         lambda r: replace_text(k8s(r) / "configmap.yaml", "drain_timeout_ms = 30000", "drain_timeout_ms = 20000"),
         "processors[0]: drain_timeout_ms 20000 >= the slowest handler's timeout_ms 30000"),
        ("a gateway without a shutdown delay",
         lambda r: replace_text(k8s(r) / "configmap.yaml", "shutdown_delay_ms = 5000", "shutdown_delay_ms = 0"),
         "gateway.shutdown_delay_ms set"),
        ("a memory request under conveyor's bounds",
         lambda r: replace_text(k8s(r) / "worker.yaml", "memory: 192Mi", "memory: 128Mi"),
         "conveyor-worker: memory request 128 MiB >= conveyor's bounds"),
        ("no topics init container",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"].pop("initContainers"))),
         "conveyor-worker: an init container runs `conveyor topics create`"),
        ("two KEDA triggers, one per topic",
         lambda r: edit_yaml(k8s(r) / "keda.yaml", pod_of("ScaledObject")(lambda d: d["spec"]["triggers"].append(
             dict(copy.deepcopy(d["spec"]["triggers"][0]), metadata=dict(d["spec"]["triggers"][0]["metadata"], topic="conveyor.tasks.thumbnail.retry"))))),
         "KEDA: one trigger per consumer group, without `topic`"),
        ("a lag threshold under the workers' concurrency",
         lambda r: replace_text(k8s(r) / "keda.yaml", 'lagThreshold: "200"', 'lagThreshold: "100"'),
         "lagThreshold 100 >= the workers' concurrency 200"),
        ("persistent lag counted",
         lambda r: replace_text(k8s(r) / "keda.yaml", 'excludePersistentLag: "true"', 'excludePersistentLag: "false"'),
         "excludePersistentLag"),
        ("KEDA not trusting the cluster's CA",
         lambda r: edit_yaml(k8s(r) / "keda.yaml", pod_of("TriggerAuthentication")(lambda d: d["spec"]["secretTargetRef"].pop())),
         "TriggerAuthentication trusts the cluster's CA"),
        ("no scale-down policy",
         lambda r: edit_yaml(k8s(r) / "keda.yaml", pod_of("ScaledObject")(lambda d: d["spec"].pop("advanced"))),
         "KEDA: a scale-down policy"),
        ("the Dockerfile copying the binary elsewhere",
         lambda r: replace_text(r / "Dockerfile", "COPY --from=build /conveyor /usr/local/bin/conveyor", "COPY --from=build /conveyor /usr/bin/conveyor"),
         "Dockerfile: ENTRYPOINT /usr/local/bin/conveyor is where the binary is copied"),
        ("a Service selecting no pod",
         lambda r: edit_yaml(k8s(r) / "gateway.yaml", pod_of("Service", "conveyor-gateway")(lambda d: d["spec"]["selector"].update({"app.kubernetes.io/component": "gateways"}))),
         "Service conveyor-gateway selects pods"),
        ("a StatefulSet governed by a Service that is not headless",
         lambda r: edit_yaml(k8s(r) / "gateway.yaml", pod_of("Service", "conveyor-gateway-pods")(lambda d: d["spec"].pop("clusterIP"))),
         "serviceName names a headless Service"),
        ("a Deployment whose selector misses its pods",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "workers"}))),
         "conveyor-worker: selector matches its pods"),
        ("an image the kustomization does not set",
         lambda r: replace_text(k8s(r) / "kustomization.yaml", "  - name: registry.example.com/conveyor\n", "  - name: registry.example.com/other\n"),
         "image is in the kustomization's images"),
        ("a manifest left out of the kustomization",
         lambda r: replace_text(k8s(r) / "kustomization.yaml", "  - keda.yaml\n", ""),
         "kustomization lists keda.yaml"),
        ("a mount of an undeclared volume",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["volumes"].pop())),
         "volume kafka-ca is declared"),
        ("a Secret that does not exist",
         lambda r: replace_text(k8s(r) / "gateway.yaml", "secretName: conveyor-gateway", "secretName: conveyor-tokens"),
         "Secret conveyor-tokens exists"),
        ("a gateway that does not wait for the topics",
         lambda r: replace_text(k8s(r) / "gateway.yaml", '"check", "--wait", "600s", ', '"check", '),
         "its topics check waits (--wait)"),
        ("a writable root filesystem",
         lambda r: edit_yaml(k8s(r) / "gateway.yaml", GATEWAY(lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"))),
         "conveyor-gateway/gateway: read-only root filesystem"),
        ("privilege escalation allowed",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True))),
         "conveyor-worker/worker: allowPrivilegeEscalation false"),
        ("capabilities kept",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities"))),
         "conveyor-worker/worker: drops ALL capabilities"),
        ("a hostPath volume",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}))),
         "conveyor-worker: no hostPath volume"),
        ("the host's network",
         lambda r: edit_yaml(k8s(r) / "worker.yaml", WORKER(lambda d: d["spec"]["template"]["spec"].update(hostNetwork=True))),
         "conveyor-worker: no hostNetwork"),
        ("a memory limit under the request",
         lambda r: replace_text(k8s(r) / "worker.yaml", "memory: 288Mi", "memory: 160Mi"),
         "conveyor-worker: memory limit 160 MiB >= its request"),
        ("more replicas than partitions",
         lambda r: replace_text(k8s(r) / "keda.yaml", "maxReplicaCount: 12", "maxReplicaCount: 24"),
         "KEDA maxReplicaCount 24 <= partitions 12"),
        ("KEDA's 0<->1 settings with a minimum of one",
         lambda r: edit_yaml(k8s(r) / "keda.yaml", pod_of("ScaledObject")(lambda d: d["spec"].update(cooldownPeriod=300))),
         "no activationLagThreshold/cooldownPeriod"),
        ("no OCI source label",
         lambda r: replace_text(r / "Dockerfile", 'org.opencontainers.image.source="${SOURCE}"', 'org.opencontainers.image.url="${SOURCE}"'),
         "Dockerfile: OCI source label"),
        ("compose workers not waiting for the topics",
         lambda r: edit_yaml(r / "deploy" / "compose" / "compose.yaml", lambda d: d["services"]["worker"].pop("depends_on")),
         "compose worker starts once the topics exist"),
        ("a compose configuration conveyor warns about",
         lambda r: replace_text(r / "deploy" / "compose" / "conveyor.toml", "drain_timeout_ms = 30000\nsession_timeout_ms = 45000\n\n[processors.tasks.echo]", "drain_timeout_ms = 10000\nsession_timeout_ms = 45000\n\n[processors.tasks.echo]"),
         "compose conveyor.toml: no configuration warning"),
        ("a compose worker killed before its drain ends",
         lambda r: replace_text(r / "deploy" / "compose" / "compose.yaml", "stop_grace_period: 50s", "stop_grace_period: 5s"),
         "compose worker: stop_grace_period 5 s covers the shutdown"),
    ]


def self_test(conveyor):
    """Each breakage on a fresh copy of the files: the check it names must
    fail (and the unbroken copy must pass them all)."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        def fresh():
            root = Path(tempfile.mkdtemp(dir=tmp))
            shutil.copy(SOURCE / "Dockerfile", root / "Dockerfile")
            shutil.copytree(SOURCE / "deploy", root / "deploy")
            return root

        clean = Checker(fresh(), conveyor, quiet=True)
        clean.run_static(external=False)
        print(f"deploy-self-test: the files as shipped: {clean.passed} passed, {len(clean.failures)} failed {clean.failures}")
        ok = not clean.failures
        for what, breakage, expected in breakages():
            root = fresh()
            breakage(root)
            checker = Checker(root, conveyor, quiet=True)
            try:
                checker.run_static(external=False)
                failed = [f for f in checker.failures if expected in f]
            except Exception as e:  # noqa: BLE001 - a crash is not a caught breakage
                failed = []
                checker.failures.append(f"crashed: {type(e).__name__}: {e}")
            caught = bool(failed)
            ok = ok and caught
            print(f"deploy-self-test: {'caught' if caught else 'MISSED'} {what}: {failed[0] if failed else checker.failures}")
        # promtool missing fails, too.
        checker = Checker(fresh(), conveyor, quiet=True)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = "/nonexistent"
        try:
            checker.promtool()
        finally:
            os.environ["PATH"] = path
        caught = any("promtool is installed" in f for f in checker.failures)
        ok = ok and caught
        print(f"deploy-self-test: {'caught' if caught else 'MISSED'} promtool missing")
    print(f"deploy-self-test: {len(breakages()) + 1} breakages, {'every one caught' if ok else 'NOT all caught'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conveyor", required=True, help="path of the conveyor binary")
    parser.add_argument("--brokers", help="a plaintext broker (host:port) for the probe checks")
    parser.add_argument("--self-test", action="store_true", help="show each check failing on a broken copy of the files")
    args = parser.parse_args()
    if args.self_test:
        sys.exit(0 if self_test(args.conveyor) else 1)
    checker = Checker(SOURCE, args.conveyor)
    toml_text, probes = checker.run_static()
    if args.brokers:
        probe_checks(checker, toml_text, probes, args.brokers)
    else:
        print("deploy-check: no --brokers: the probe paths were not requested")
    print(f"deploy: {checker.passed} passed, {len(checker.failures)} failed")
    sys.exit(1 if checker.failures else 0)


if __name__ == "__main__":
    main()
