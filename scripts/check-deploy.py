#!/usr/bin/env python3
"""Checks the deployment files against each other and against the code, so
a renamed flag, metric, user, path or port fails CI instead of a deploy.

    python3 scripts/check-deploy.py              # the repository's files
    python3 scripts/check-deploy.py --root DIR   # another tree of the same shape
    python3 scripts/check-deploy.py --self-test  # every check must catch its fixture

Prints one line per problem (`file: problem`) and exits 1 if there is any.
Python 3 standard library plus PyYAML. Uses, when they are installed:
`docker-compose` (`config -q`), `kubernetes-validate` (Kubernetes schemas,
offline; or the command named by $KUBERNETES_VALIDATE) and `kubectl
kustomize`; without them those extra checks are skipped with a note.

What is checked:

- compose (docker-compose.yml): it parses (and `docker-compose config -q`
  accepts it: every service, those of profiles included); every
  bind-mounted host path, env_file and build context / dockerfile exists;
  every service another one waits for with `condition: service_healthy`
  exists and has a healthcheck (its own, or a HEALTHCHECK in the Dockerfile
  its image is built from); a service depends only on services that run
  whenever it runs (none of a profile it is not in); no two services
  publish the same host port; every host in an AMQP or management URL
  (each entry of a comma-separated list) is a compose service.
- environment: every GUILDHALL_* variable set in compose or in deploy/k8s is
  one the binaries read (`env = "..."` in coordinator/src/cli/mod.rs and
  agent/src/cli.rs).
- Grafana: the dashboard parses; every datasource uid in it (panels, nested
  rows, targets, templating, annotations) is provisioned; the dashboard
  provider's path, the provisioning directories and the datasource's host
  match what compose mounts and runs.
- RabbitMQ (deploy/rabbitmq/definitions.json): it parses; permissions,
  topic permissions, policies, queues, exchanges refer to defined users and
  vhosts; user tags are RabbitMQ's; every user in an AMQP or management URL
  of compose or deploy/k8s exists, has that password, has permissions on
  the URL's vhost (AMQP) or a management tag (management URL); policy
  patterns compile and a stream policy matches `<namespace>.events`.
- RabbitMQ cluster (compose services whose mounted rabbitmq.conf or
  conf.d files list `cluster_formation.classic_config.nodes.*`): the list
  names exactly those services' nodes (`rabbit@<hostname>`, so each sets
  `hostname`), they share one RABBITMQ_ERLANG_COOKIE, and they set
  `cluster_partition_handling = pause_minority`.
- Prometheus (deploy/prometheus/prometheus.yml): every scrape target's host
  is a compose service; every rule file is mounted from an existing file.
- Kubernetes (deploy/k8s): every file parses (multi-document); every
  document has apiVersion, kind, metadata.name; Deployments' selectors
  match their template labels, containers have name and image, probes use
  declared ports; Services select a Deployment's pods and target its ports;
  secret, volume claim and ServiceMonitor references resolve; agents' grace
  period outlasts GUILDHALL_SHUTDOWN_TIMEOUT; each ScaledObject targets a
  Deployment, has a prometheus trigger with ignoreNullValues "false", a
  fallback, metricType AverageValue, and a query on a metric that
  coordinator/src/metrics.rs defines, for the stage its Deployment's agent
  serves; kustomization.yaml lists exactly the YAML files present.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

try:
    import yaml
except ImportError:  # pragma: no cover - reported, not raised
    sys.stderr.write(
        "check-deploy: PyYAML is missing: apt-get install python3-yaml "
        "(or python3 -m pip install pyyaml)\n"
    )
    sys.exit(2)

COMPOSE = "docker-compose.yml"
DOCKERFILE = "deploy/Dockerfile"
COORDINATOR_CLI = "coordinator/src/cli/mod.rs"
AGENT_CLI = "agent/src/cli.rs"
METRICS_RS = "coordinator/src/metrics.rs"
DASHBOARD = "deploy/grafana/dashboards/guildhall.json"
DASHBOARDS_DIR = "deploy/grafana/dashboards"
GRAFANA_DATASOURCES = "deploy/grafana/provisioning/datasources"
GRAFANA_PROVIDERS = "deploy/grafana/provisioning/dashboards"
DEFINITIONS = "deploy/rabbitmq/definitions.json"
PROMETHEUS = "deploy/prometheus/prometheus.yml"
K8S = "deploy/k8s"
KUSTOMIZATION = "kustomization.yaml"

# Tags RabbitMQ knows (rabbitmq.com/docs/management#permissions).
RABBIT_TAGS = {"administrator", "monitoring", "policymaker", "management", "impersonator"}
MANAGEMENT_TAGS = {"administrator", "monitoring", "policymaker", "management"}
# Grafana's built-in pseudo datasources.
GRAFANA_BUILTIN_UIDS = {"-- Grafana --", "-- Mixed --", "-- Dashboard --", "grafana"}
DEFAULT_NAMESPACE = "guildhall"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# The Kubernetes version kubernetes-validate checks against: the oldest
# the manifests claim to support.
K8S_SCHEMA_VERSION = "1.29.0"

# A comma ends a URL's path: several URLs in one value are a comma list (a
# comma inside a vhost is written %2C).
URL_RE = re.compile(r"\b(amqps?|https?)://([^\s:/@'\"]+):([^\s@'\"]*)@([^\s/'\"?#,]+)(/[^\s'\"?#,]*)?")
ENV_DECL_RE = re.compile(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"')
METRIC_DECL_RE = re.compile(r'"(guildhall_[a-z0-9_]+)"')
METRIC_USE_RE = re.compile(r"\b(guildhall_[a-z0-9_]+)\b")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


class Checker:
    """Runs every check on a tree and collects one line per problem."""

    def __init__(self, root, tools=True):
        self.root = os.path.abspath(root)
        self.tools = tools
        self.problems = []
        self.notes = []
        self.passed = []
        self.compose = None  # parsed docker-compose.yml, when it parses
        self.k8s_docs = []  # (relative file, document)
        self.definitions = None
        self.env_names = None  # env vars the binaries read

    # ----- helpers -----

    def path(self, rel):
        return os.path.join(self.root, rel)

    def exists(self, rel):
        return os.path.exists(self.path(rel))

    def problem(self, where, text):
        self.problems.append(f"{where}: {text}")

    def note(self, text):
        self.notes.append(text)

    def rel(self, abspath):
        return os.path.relpath(abspath, self.root)

    def load_yaml(self, rel, multi=False):
        """Parsed YAML (a list of documents with multi) or None after
        reporting why."""
        if not self.exists(rel):
            self.problem(rel, "missing")
            return None
        try:
            with open(self.path(rel), encoding="utf-8") as f:
                if multi:
                    return [d for d in yaml.safe_load_all(f) if d is not None]
                return yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            self.problem(rel, "is not valid YAML: " + one_line(str(e)))
            return None

    def load_json(self, rel):
        if not self.exists(rel):
            self.problem(rel, "missing")
            return None
        try:
            with open(self.path(rel), encoding="utf-8") as f:
                return json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            self.problem(rel, "is not valid JSON: " + one_line(str(e)))
            return None

    def read_text(self, rel):
        try:
            with open(self.path(rel), encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    # ----- run -----

    def run(self):
        self.env_names = self.binary_env_names()
        self.check_compose()
        self.load_k8s()
        self.check_env_names()
        self.check_grafana()
        self.check_rabbitmq()
        self.check_prometheus()
        self.check_k8s()
        return self.problems

    def section(self, name, before):
        """Records a section as passed if it added no problem."""
        if len(self.problems) == before:
            self.passed.append(name)

    # ----- sources -----

    def binary_env_names(self):
        names = set()
        for rel in (COORDINATOR_CLI, AGENT_CLI):
            text = self.read_text(rel)
            if text is None:
                self.problem(rel, "missing: cannot tell which environment variables the binaries read")
                continue
            found = set(ENV_DECL_RE.findall(text))
            if not found:
                self.problem(rel, 'declares no `env = "NAME"`: the pattern this check reads is out of date')
            names |= found
        return names

    def metric_names(self):
        text = self.read_text(METRICS_RS)
        if text is None:
            self.problem(METRICS_RS, "missing: cannot check metric names")
            return None
        return set(METRIC_DECL_RE.findall(text))

    # ----- compose -----

    def compose_services(self):
        if not isinstance(self.compose, dict):
            return {}
        services = self.compose.get("services")
        return services if isinstance(services, dict) else {}

    def bind_mounts(self):
        """(service, host absolute path, container path, where) of every
        bind mount in compose whose host path is local (not a variable)."""
        out = []
        base = self.root
        for name, svc in self.compose_services().items():
            if not isinstance(svc, dict):
                continue
            for i, vol in enumerate(svc.get("volumes") or []):
                where = f"{COMPOSE}: service {name}: volumes[{i}]"
                src = target = None
                if isinstance(vol, str):
                    parts = vol.split(":")
                    if len(parts) >= 2 and parts[0][:1] in (".", "/", "~"):
                        src, target = parts[0], parts[1]
                elif isinstance(vol, dict) and vol.get("type") == "bind":
                    src, target = vol.get("source"), vol.get("target")
                    if not src or not target:
                        self.problem(where, "bind mount without source or target")
                        continue
                if src is None or "$" in str(src) or str(src).startswith("~"):
                    continue
                host = os.path.normpath(os.path.join(base, str(src)))
                out.append((name, host, str(target).rstrip("/") or "/", where, str(src)))
        return out

    def host_paths_for(self, container_path):
        """Host paths that compose mounts at container_path (by any mount
        that covers it), with the service."""
        container_path = container_path.rstrip("/") or "/"
        found = []
        for service, host, target, _, _ in self.bind_mounts():
            if container_path == target:
                found.append((service, host))
            elif container_path.startswith(target + "/"):
                found.append((service, os.path.join(host, container_path[len(target) + 1:])))
        return found

    def healthcheck_dockerfiles(self):
        """Dockerfiles (absolute) that declare a HEALTHCHECK, by the image
        names of the services built from them."""
        images = {}
        for name, svc in self.compose_services().items():
            if not isinstance(svc, dict) or "build" not in svc:
                continue
            dockerfile = self.dockerfile_of(svc)
            if dockerfile and dockerfile_has_healthcheck(dockerfile):
                images[name] = dockerfile
                if svc.get("image"):
                    images["image:" + str(svc["image"])] = dockerfile
        return images

    def dockerfile_of(self, svc):
        build = svc.get("build")
        if isinstance(build, str):
            return os.path.join(self.root, build, "Dockerfile")
        if isinstance(build, dict):
            context = os.path.join(self.root, str(build.get("context", ".")))
            return os.path.join(context, str(build.get("dockerfile", "Dockerfile")))
        return None

    def check_compose(self):
        before = len(self.problems)
        if not self.exists(COMPOSE):
            self.problem(COMPOSE, "missing")
            return
        if self.tools and shutil.which("docker-compose"):
            r = subprocess.run(
                ["docker-compose", "-f", COMPOSE, "config", "-q"],
                cwd=self.root, capture_output=True, text=True, timeout=120,
            )
            if r.returncode != 0:
                err = [l for l in (r.stderr or r.stdout).splitlines() if l.strip()]
                self.problem(COMPOSE, "docker-compose config -q failed: " + (" ".join(err[-3:]) or f"exit {r.returncode}"))
        elif self.tools:
            self.note("docker-compose not installed: `docker-compose config -q` skipped")
        self.compose = self.load_yaml(COMPOSE)
        if self.compose is None:
            return
        services = self.compose_services()
        if not services:
            self.problem(COMPOSE, "defines no services")
            return
        for service, host, target, where, src in self.bind_mounts():
            if not os.path.exists(host):
                self.problem(where, f"bind-mounted host path {src} does not exist")
        for name, svc in services.items():
            if not isinstance(svc, dict):
                self.problem(COMPOSE, f"service {name} is not a mapping")
                continue
            env_files = svc.get("env_file") or []
            for ef in [env_files] if isinstance(env_files, (str, dict)) else env_files:
                path = ef.get("path") if isinstance(ef, dict) else ef
                required = not (isinstance(ef, dict) and ef.get("required") is False)
                if path and required and "$" not in str(path) and not os.path.exists(self.path(str(path))):
                    self.problem(f"{COMPOSE}: service {name}", f"env_file {path} does not exist")
            build = svc.get("build")
            if build is not None:
                context = build if isinstance(build, str) else (build.get("context", ".") if isinstance(build, dict) else None)
                if context is None:
                    self.problem(f"{COMPOSE}: service {name}", "build is neither a path nor a mapping")
                elif "://" not in str(context) and not os.path.isdir(self.path(str(context))):
                    self.problem(f"{COMPOSE}: service {name}", f"build context {context} does not exist")
                else:
                    dockerfile = self.dockerfile_of(svc)
                    if dockerfile and "://" not in str(context) and not os.path.isfile(dockerfile):
                        self.problem(f"{COMPOSE}: service {name}", f"build.dockerfile {self.rel(dockerfile)} does not exist")
        for top in ("configs", "secrets"):
            for key, item in (self.compose.get(top) or {}).items():
                if isinstance(item, dict) and item.get("file") and "$" not in str(item["file"]):
                    if not os.path.exists(self.path(str(item["file"]))):
                        self.problem(f"{COMPOSE}: {top}.{key}", f"file {item['file']} does not exist")
        healthy_images = self.healthcheck_dockerfiles()
        for name, svc in services.items():
            if not isinstance(svc, dict):
                continue
            deps = svc.get("depends_on") or {}
            if isinstance(deps, list):
                deps = {d: {} for d in deps}
            for dep, cond in deps.items():
                if dep not in services:
                    self.problem(f"{COMPOSE}: service {name}", f"depends_on names service {dep}, which does not exist")
                    continue
                if not (isinstance(cond, dict) and cond.get("condition") == "service_healthy"):
                    continue
                target = services[dep] if isinstance(services[dep], dict) else {}
                hc = target.get("healthcheck")
                if isinstance(hc, dict) and not hc.get("disable") and hc.get("test") not in (["NONE"], "NONE", None):
                    continue
                if isinstance(hc, dict) and (hc.get("disable") or hc.get("test") in (["NONE"], "NONE")):
                    self.problem(f"{COMPOSE}: service {name}", f"waits for {dep} to be healthy, but {dep}'s healthcheck is disabled")
                    continue
                if dep in healthy_images or ("image:" + str(target.get("image"))) in healthy_images:
                    continue
                self.problem(
                    f"{COMPOSE}: service {name}",
                    f"waits for {dep} with condition service_healthy, but {dep} has no healthcheck "
                    "(none in compose, and its image is not built from a Dockerfile with a HEALTHCHECK)",
                )
        self.check_compose_profiles(services)
        self.check_compose_ports(services)
        self.section("compose", before)

    @staticmethod
    def profiles_of(svc):
        """The profiles a compose service runs with; empty: it always runs."""
        p = svc.get("profiles") if isinstance(svc, dict) else None
        return {str(x) for x in p} if isinstance(p, list) else set()

    def check_compose_profiles(self, services):
        """A dependency must run whenever its dependent does: a service
        without profiles (always started) or one of every profile the
        dependent runs with."""
        for name, svc in services.items():
            if not isinstance(svc, dict):
                continue
            mine = self.profiles_of(svc)
            deps = svc.get("depends_on") or {}
            for dep in deps if isinstance(deps, (list, dict)) else []:
                theirs = self.profiles_of(services.get(dep))
                if theirs and not (mine and mine <= theirs):
                    when = f"with profile {', '.join(sorted(mine))}" if mine else "without any profile"
                    self.problem(f"{COMPOSE}: service {name}", f"depends on {dep}, which runs only with profile {', '.join(sorted(theirs))}, but {name} runs {when}")

    def check_compose_ports(self, services):
        """No two services publish the same host port (whatever their
        profiles: both may be enabled at once)."""
        owner = {}
        for name, svc in services.items():
            if not isinstance(svc, dict):
                continue
            for port in svc.get("ports") or []:
                published = host_port(port)
                if published is None:
                    continue
                if published in owner and owner[published] != name:
                    self.problem(f"{COMPOSE}: service {name}", f"publishes host port {published[0]}/{published[1]}, which service {owner[published]} publishes too")
                owner.setdefault(published, name)

    # ----- environment variable names -----

    def compose_env(self):
        """(service, NAME, value or None) for every environment entry."""
        for name, svc in self.compose_services().items():
            if not isinstance(svc, dict):
                continue
            env = svc.get("environment") or {}
            if isinstance(env, dict):
                for k, v in env.items():
                    yield name, str(k), None if v is None else str(v)
            elif isinstance(env, list):
                for item in env:
                    k, _, v = str(item).partition("=")
                    yield name, k, v

    def k8s_containers(self):
        """(file, deployment doc, container) for every container and init
        container of every workload."""
        for rel, doc in self.k8s_docs:
            if doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                continue
            spec = (((doc.get("spec") or {}).get("template") or {}).get("spec") or {})
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                if isinstance(c, dict):
                    yield rel, doc, c

    def check_env_names(self):
        before = len(self.problems)
        if not self.env_names:
            return
        for service, name, _ in self.compose_env():
            if name.startswith("GUILDHALL_") and name not in self.env_names:
                self.problem(f"{COMPOSE}: service {service}", f"sets {name}, which neither binary reads (see `env = \"...\"` in {COORDINATOR_CLI}, {AGENT_CLI})")
        for rel, doc, c in self.k8s_containers():
            for e in c.get("env") or []:
                name = str((e or {}).get("name", ""))
                if name.startswith("GUILDHALL_") and name not in self.env_names:
                    self.problem(f"{K8S}/{rel}: {doc_id(doc)}: container {c.get('name')}", f"sets {name}, which neither binary reads (see `env = \"...\"` in {COORDINATOR_CLI}, {AGENT_CLI})")
        self.section("environment variable names", before)

    # ----- Grafana -----

    def check_grafana(self):
        before = len(self.problems)
        uids, names, urls = set(), set(), []
        ds_dir = self.path(GRAFANA_DATASOURCES)
        files = yaml_files(ds_dir)
        if not files:
            self.problem(GRAFANA_DATASOURCES, "missing or holds no .yml file")
        for f in files:
            rel = f"{GRAFANA_DATASOURCES}/{f}"
            doc = self.load_yaml(rel)
            if doc is None:
                continue
            for ds in (doc or {}).get("datasources") or []:
                if not isinstance(ds, dict):
                    continue
                if ds.get("uid"):
                    uids.add(str(ds["uid"]))
                else:
                    self.problem(rel, f"datasource {ds.get('name')!r} has no uid: dashboards cannot refer to it stably")
                if ds.get("name"):
                    names.add(str(ds["name"]))
                if ds.get("url"):
                    urls.append((rel, str(ds["url"])))
        dash = self.load_json(DASHBOARD)
        if dash is not None and (uids or names):
            for where, ref in datasource_refs(dash):
                if isinstance(ref, dict):
                    uid = ref.get("uid")
                    if uid is None or str(uid).startswith("$") or str(uid) in GRAFANA_BUILTIN_UIDS:
                        continue
                    if str(uid) not in uids:
                        self.problem(DASHBOARD, f"{where}: datasource uid {uid!r} is not provisioned (known: {', '.join(sorted(uids)) or 'none'})")
                elif isinstance(ref, str):
                    if ref.startswith("$") or ref in GRAFANA_BUILTIN_UIDS or ref in names or ref in uids:
                        continue
                    self.problem(DASHBOARD, f"{where}: datasource {ref!r} is not provisioned")
        services = self.compose_services()
        if services:
            for rel, url in urls:
                host = urllib.parse.urlsplit(url).hostname
                if host and host not in self.compose_hosts() and host not in ("localhost", "127.0.0.1"):
                    self.problem(rel, f"datasource url {url} names host {host}, which is no compose service")
        for f in yaml_files(self.path(GRAFANA_PROVIDERS)) or []:
            rel = f"{GRAFANA_PROVIDERS}/{f}"
            doc = self.load_yaml(rel)
            for p in (doc or {}).get("providers") or []:
                path = ((p or {}).get("options") or {}).get("path")
                if not path:
                    self.problem(rel, f"provider {p.get('name')!r} has no options.path")
                    continue
                if not services:
                    continue
                self.expect_mount(rel, f"dashboard provider path {path}", path, DASHBOARDS_DIR)
        if not yaml_files(self.path(GRAFANA_PROVIDERS)):
            self.problem(GRAFANA_PROVIDERS, "missing or holds no .yml file")
        if services and any("grafana" in str((s or {}).get("image", "")) for s in services.values() if isinstance(s, dict)):
            for sub, rel in (("datasources", GRAFANA_DATASOURCES), ("dashboards", GRAFANA_PROVIDERS)):
                self.expect_mount(COMPOSE, f"Grafana's provisioning/{sub}", "/etc/grafana/provisioning/" + sub, rel)
        self.section("Grafana", before)

    def expect_mount(self, where, what, container_path, expected_rel):
        """Reports unless compose mounts the repository's expected_rel at
        container_path."""
        found = self.host_paths_for(container_path)
        expected = os.path.normpath(self.path(expected_rel))
        if not found:
            self.problem(where, f"{what}: no compose service mounts anything at {container_path} (expected {expected_rel})")
        elif not any(os.path.normpath(h) == expected for _, h in found):
            got = ", ".join(f"{self.rel(h)} (service {s})" for s, h in found)
            self.problem(where, f"{what}: compose mounts {got} at {container_path}, not {expected_rel}")

    def compose_hosts(self):
        hosts = set()
        for name, svc in self.compose_services().items():
            hosts.add(name)
            if isinstance(svc, dict):
                for key in ("hostname", "container_name"):
                    if svc.get(key):
                        hosts.add(str(svc[key]))
                nets = svc.get("networks")
                if isinstance(nets, dict):
                    for net in nets.values():
                        for alias in (net or {}).get("aliases") or []:
                            hosts.add(str(alias))
        return hosts

    # ----- RabbitMQ -----

    def urls_in_deploy_files(self):
        """(where, scheme, user, password, host, vhost, is_management) of
        every URL with credentials in compose and the k8s manifests."""
        sources = []
        if isinstance(self.compose, dict):
            sources.append((COMPOSE, self.compose))
        for rel, doc in self.k8s_docs:
            if doc.get("kind") == "Secret" and isinstance(doc.get("data"), dict):
                decoded = {}
                for k, v in doc["data"].items():
                    try:
                        decoded[k] = base64.b64decode(str(v)).decode("utf-8")
                    except (ValueError, UnicodeDecodeError):
                        self.problem(f"{K8S}/{rel}", f"Secret {doc_id(doc)} data.{k} is not base64 UTF-8")
                doc = dict(doc, data=decoded)
            sources.append((f"{K8S}/{rel}", doc))
        out = []
        for where, doc in sources:
            for context, text in walk_strings(doc):
                for m in URL_RE.finditer(text):
                    scheme, user, password, hostport, path = m.groups()
                    user = urllib.parse.unquote(user)
                    password = urllib.parse.unquote(password)
                    port = hostport.rsplit(":", 1)[1] if ":" in hostport else ""
                    management = scheme.startswith("http") and (port == "15672" or "management" in context.lower())
                    if scheme.startswith("http") and not management:
                        continue
                    vhost = None
                    if scheme.startswith("amqp"):
                        vhost = urllib.parse.unquote((path or "/")[1:]) if path and path != "/" else "/"
                    out.append((f"{where}: {context}", scheme, user, password, hostport, vhost, management))
        return out

    def check_rabbitmq(self):
        before = len(self.problems)
        d = self.load_json(DEFINITIONS)
        if d is None:
            return
        if not isinstance(d, dict):
            self.problem(DEFINITIONS, "is not a JSON object")
            return
        self.definitions = d
        users = {}
        for u in d.get("users") or []:
            if not isinstance(u, dict) or not u.get("name"):
                self.problem(DEFINITIONS, f"a user without a name: {u!r}")
                continue
            users[u["name"]] = u
            tags = u.get("tags", "")
            tags = tags if isinstance(tags, list) else [t for t in str(tags).split(",")]
            for t in (t.strip() for t in tags):
                if t and t not in RABBIT_TAGS:
                    self.problem(DEFINITIONS, f"user {u['name']}: unknown tag {t!r} (RabbitMQ knows {', '.join(sorted(RABBIT_TAGS))})")
            if "password_hash" not in u and "password" not in u:
                self.problem(DEFINITIONS, f"user {u['name']}: no password_hash")
        vhosts = {v.get("name") for v in d.get("vhosts") or [] if isinstance(v, dict)}
        if not vhosts:
            self.problem(DEFINITIONS, "defines no vhost")
        perms = {}
        for key in ("permissions", "topic_permissions"):
            for p in d.get(key) or []:
                p = p or {}
                if p.get("user") not in users:
                    self.problem(DEFINITIONS, f"{key}: user {p.get('user')!r} is not defined")
                if p.get("vhost") not in vhosts:
                    self.problem(DEFINITIONS, f"{key}: vhost {p.get('vhost')!r} is not defined")
                for field in ("configure", "write", "read"):
                    if field in p and not compiles(p[field]):
                        self.problem(DEFINITIONS, f"{key}: user {p.get('user')}: {field} pattern {p[field]!r} does not compile")
                if key == "permissions":
                    perms[(p.get("user"), p.get("vhost"))] = p
        for key in ("queues", "exchanges", "bindings"):
            for item in d.get(key) or []:
                if (item or {}).get("vhost") not in vhosts:
                    self.problem(DEFINITIONS, f"{key}: {item.get('name') or item.get('source')!r} is in vhost {item.get('vhost')!r}, which is not defined")
        namespaces = self.namespaces()
        stream_policies = []
        for p in d.get("policies") or []:
            p = p or {}
            name = p.get("name")
            if p.get("vhost") not in vhosts:
                self.problem(DEFINITIONS, f"policy {name!r}: vhost {p.get('vhost')!r} is not defined")
            pattern = p.get("pattern")
            if not isinstance(pattern, str) or not compiles(pattern):
                self.problem(DEFINITIONS, f"policy {name!r}: pattern {pattern!r} does not compile")
                continue
            definition = p.get("definition") or {}
            if "stream" in str(name).lower() or any(k in definition for k in ("max-age", "stream-max-segment-size-bytes")):
                stream_policies.append((name, pattern))
        for ns in sorted(namespaces):
            stream = f"{ns}.events"
            if not stream_policies:
                self.problem(DEFINITIONS, f"no stream policy (a policy named *stream* or setting max-age) for the events stream {stream}")
            elif not any(re.search(pat, stream) for _, pat in stream_policies):
                pats = ", ".join(f"{n} {pat!r}" for n, pat in stream_policies)
                self.problem(DEFINITIONS, f"no stream policy matches the events stream {stream} (policies: {pats})")
        compose_hosts = self.compose_hosts() if self.compose_services() else None
        for where, scheme, user, password, host, vhost, management in self.urls_in_deploy_files():
            kind = "management URL" if management else f"{scheme} URL"
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if compose_hosts is not None and where.startswith(COMPOSE) and "$" not in hostname \
                    and hostname not in compose_hosts and hostname not in ("localhost", "127.0.0.1"):
                self.problem(where, f"{kind} names host {hostname}, which is no compose service")
            if user not in users:
                self.problem(where, f"{kind} uses RabbitMQ user {user!r}, which {DEFINITIONS} does not define")
                continue
            if not password_matches(users[user], password):
                self.problem(where, f"{kind}: the password for user {user!r} is not the one in {DEFINITIONS}")
            if management:
                tags = users[user].get("tags", "")
                tags = set(tags if isinstance(tags, list) else [t.strip() for t in str(tags).split(",")])
                if not tags & MANAGEMENT_TAGS:
                    self.problem(where, f"management URL uses user {user!r}, whose tags ({', '.join(sorted(tags - {''})) or 'none'}) give no management API access")
            elif vhost not in vhosts:
                self.problem(where, f"{kind} uses vhost {vhost!r}, which {DEFINITIONS} does not define")
            elif (user, vhost) not in perms:
                self.problem(where, f"{kind}: user {user!r} has no permissions on vhost {vhost!r} in {DEFINITIONS}")
        self.check_rabbitmq_cluster()
        self.section("RabbitMQ", before)

    def rabbitmq_settings(self, name, svc):
        """The `key = value` settings of the rabbitmq.conf and conf.d files
        compose mounts into a service (rabbitmq.conf first, then conf.d in
        name order: a later value wins, as in RabbitMQ)."""
        files = []
        for service, host, target, _, _ in self.bind_mounts():
            if service != name or not os.path.isfile(host):
                continue
            if target == "/etc/rabbitmq/rabbitmq.conf":
                files.append(("", host))
            elif target.startswith("/etc/rabbitmq/conf.d/"):
                files.append((target, host))
        settings = {}
        for _, host in sorted(files):
            with open(host, encoding="utf-8") as f:
                for line in f:
                    key, eq, value = line.split("#", 1)[0].partition("=")
                    if eq and key.strip():
                        settings[key.strip()] = value.strip()
        return settings

    def check_rabbitmq_cluster(self):
        """Compose services clustered by classic_config peer discovery."""
        clusters = {}
        for name, svc in self.compose_services().items():
            if not isinstance(svc, dict):
                continue
            settings = self.rabbitmq_settings(name, svc)
            listed = tuple(sorted(v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.nodes.")))
            if listed:
                clusters.setdefault(listed, []).append((name, svc, settings))
        for listed, members in clusters.items():
            where = f"{COMPOSE}: RabbitMQ cluster {', '.join(n for n, _, _ in members)}"
            env = {n: dict((k, v) for s2, k, v in self.compose_env() if s2 == n) for n, _, _ in members}
            nodes = {}
            for name, svc, settings in members:
                if not svc.get("hostname"):
                    self.problem(where, f"service {name} sets no hostname: its node name (rabbit@<hostname>) would change with every container, and its peers could not list it")
                    continue
                prefix = (env[name].get("RABBITMQ_NODENAME") or "rabbit@").split("@")[0]
                nodes[f"{prefix}@{svc['hostname']}"] = name
                if settings.get("cluster_partition_handling") != "pause_minority":
                    self.problem(where, f"service {name}: cluster_partition_handling is {settings.get('cluster_partition_handling', 'ignore (the default)')}, not pause_minority: both sides of a partition would keep accepting work")
            for node in listed:
                if node not in nodes:
                    self.problem(where, f"cluster_formation.classic_config lists {node}, which is no service's node name ({', '.join(sorted(nodes)) or 'none'})")
            for node, name in nodes.items():
                if node not in listed:
                    self.problem(where, f"service {name} (node {node}) is not in its own cluster_formation.classic_config list")
            cookies = {env[n].get("RABBITMQ_ERLANG_COOKIE") for n, _, _ in members}
            if len(cookies) != 1 or None in cookies:
                self.problem(where, "the nodes do not all set the same RABBITMQ_ERLANG_COOKIE: nodes with different Erlang cookies cannot cluster")

    def namespaces(self):
        found = set()
        for _, name, value in self.compose_env():
            if name == "GUILDHALL_NAMESPACE" and value and "$" not in value:
                found.add(value)
        for _, _, c in self.k8s_containers():
            for e in c.get("env") or []:
                if (e or {}).get("name") == "GUILDHALL_NAMESPACE" and e.get("value"):
                    found.add(str(e["value"]))
        return found or {DEFAULT_NAMESPACE}

    # ----- Prometheus -----

    def check_prometheus(self):
        before = len(self.problems)
        doc = self.load_yaml(PROMETHEUS)
        if doc is None:
            return
        if not isinstance(doc, dict):
            self.problem(PROMETHEUS, "is not a mapping")
            return
        services = self.compose_services()
        if not services:
            self.note(f"{PROMETHEUS}: no compose services to check targets against")
        hosts = self.compose_hosts()
        listens = {svc: value for svc, name, value in self.compose_env() if name == "GUILDHALL_LISTEN" and value}
        targets = 0
        for job in doc.get("scrape_configs") or []:
            for sc in (job or {}).get("static_configs") or []:
                for t in (sc or {}).get("targets") or []:
                    targets += 1
                    host = str(t).rsplit(":", 1)[0]
                    if services and host not in hosts and host not in ("localhost", "127.0.0.1"):
                        self.problem(PROMETHEUS, f"job {job.get('job_name')}: target {t} names host {host}, which is no compose service")
                    listen = listen_port(listens.get(host))
                    port = str(t).rsplit(":", 1)[1] if ":" in str(t) else None
                    if listen is not None and port is not None and port.isdigit() and int(port) != listen:
                        self.problem(PROMETHEUS, f"job {job.get('job_name')}: target {t}, but service {host} listens on port {listen} (GUILDHALL_LISTEN={listens[host]})")
        if targets == 0:
            self.problem(PROMETHEUS, "scrapes no static target")
        if services:
            for rf in doc.get("rule_files") or []:
                rf = str(rf)
                if not rf.startswith("/") or "*" in rf:
                    continue
                found = self.host_paths_for(rf)
                if not found:
                    self.problem(PROMETHEUS, f"rule file {rf}: no compose service mounts anything there")
                elif not any(os.path.isfile(h) for _, h in found):
                    self.problem(PROMETHEUS, f"rule file {rf}: compose mounts {', '.join(self.rel(h) for _, h in found)} there, which is not a file")
        self.section("Prometheus", before)

    # ----- Kubernetes -----

    def load_k8s(self):
        d = self.path(K8S)
        if not os.path.isdir(d):
            self.problem(K8S, "missing")
            return
        for f in yaml_files(d):
            if f == KUSTOMIZATION:
                continue
            docs = self.load_yaml(f"{K8S}/{f}", multi=True)
            for i, doc in enumerate(docs or []):
                where = f"{K8S}/{f}" + (f" (document {i + 1})" if len(docs) > 1 else "")
                if not isinstance(doc, dict):
                    self.problem(where, "is not a mapping")
                    continue
                missing = [k for k in ("apiVersion", "kind") if not doc.get(k)]
                if not ((doc.get("metadata") or {}).get("name")):
                    missing.append("metadata.name")
                if missing:
                    self.problem(where, "has no " + ", ".join(missing))
                    continue
                self.k8s_docs.append((f, doc))

    def of_kind(self, kind):
        return [(rel, d) for rel, d in self.k8s_docs if d.get("kind") == kind]

    def check_k8s(self):
        before = len(self.problems)
        if not os.path.isdir(self.path(K8S)):
            return
        deployments = self.of_kind("Deployment")
        secrets = {d["metadata"]["name"]: d for _, d in self.of_kind("Secret")}
        claims = {d["metadata"]["name"] for _, d in self.of_kind("PersistentVolumeClaim")}
        configmaps = {d["metadata"]["name"] for _, d in self.of_kind("ConfigMap")}
        for rel, dep in deployments:
            where = f"{K8S}/{rel}: Deployment {dep['metadata']['name']}"
            spec = dep.get("spec") or {}
            template = spec.get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            if not selector:
                self.problem(where, "has no spec.selector.matchLabels")
            for k, v in selector.items():
                if labels.get(k) != v:
                    self.problem(where, f"selector {k}={v} is not among the pod template's labels")
            pod = template.get("spec") or {}
            containers = pod.get("containers") or []
            if not containers:
                self.problem(where, "has no containers")
            volumes = {}
            for v in pod.get("volumes") or []:
                volumes[(v or {}).get("name")] = v
                pvc = ((v or {}).get("persistentVolumeClaim") or {}).get("claimName")
                if pvc and pvc not in claims:
                    self.problem(where, f"volume {v.get('name')} claims PersistentVolumeClaim {pvc}, which no file here defines")
                cm = ((v or {}).get("configMap") or {}).get("name")
                if cm and cm not in configmaps and not v["configMap"].get("optional"):
                    self.problem(where, f"volume {v.get('name')} uses ConfigMap {cm}, which no file here defines")
                sec = ((v or {}).get("secret") or {}).get("secretName")
                if sec and sec not in secrets and not v["secret"].get("optional"):
                    self.problem(where, f"volume {v.get('name')} uses Secret {sec}, which no file here defines")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            for c in containers + (pod.get("initContainers") or []):
                cname = c.get("name") if isinstance(c, dict) else None
                cwhere = f"{where}: container {cname}"
                if not isinstance(c, dict) or not cname or not c.get("image"):
                    self.problem(cwhere, "needs a name and an image")
                    continue
                ports = c.get("ports") or []
                names = {p.get("name") for p in ports if p.get("name")}
                numbers = {p.get("containerPort") for p in ports}
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    pr = c.get(probe)
                    if not isinstance(pr, dict):
                        continue
                    for handler in ("httpGet", "tcpSocket", "grpc"):
                        port = (pr.get(handler) or {}).get("port")
                        if port is None:
                            continue
                        if isinstance(port, str) and not port.isdigit():
                            if port not in names:
                                self.problem(cwhere, f"{probe} uses port {port!r}, which the container does not declare (ports: {', '.join(sorted(n for n in names)) or 'none'})")
                        elif int(port) not in numbers:
                            self.problem(cwhere, f"{probe} uses port {port}, which the container does not declare")
                for m in c.get("volumeMounts") or []:
                    if (m or {}).get("name") not in volumes:
                        self.problem(cwhere, f"mounts volume {m.get('name')}, which the pod does not define")
                env = {}
                for e in c.get("env") or []:
                    e = e or {}
                    env[e.get("name")] = e.get("value")
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        sec = secrets.get(ref.get("name"))
                        if sec is None:
                            self.problem(cwhere, f"env {e.get('name')} reads Secret {ref.get('name')}, which no file here defines")
                        elif ref.get("key") not in set((sec.get("stringData") or {})) | set((sec.get("data") or {})):
                            self.problem(cwhere, f"env {e.get('name')} reads key {ref.get('key')} of Secret {ref.get('name')}, which it does not have")
                for var in ("GUILDHALL_LISTEN", "GUILDHALL_PROBE_LISTEN"):
                    port = listen_port(env.get(var))
                    if port is not None and port not in numbers:
                        self.problem(cwhere, f"{var}={env.get(var)} listens on port {port}, which the container does not declare")
                worker_url = env.get("GUILDHALL_WORKER_URL")
                if worker_url:
                    u = urllib.parse.urlsplit(worker_url)
                    pod_ports = {p.get("containerPort") for c2 in containers + (pod.get("initContainers") or []) if isinstance(c2, dict) and c2 is not c for p in (c2.get("ports") or [])}
                    if u.hostname in ("127.0.0.1", "localhost", "::1") and (u.port or 80) not in pod_ports:
                        self.problem(cwhere, f"GUILDHALL_WORKER_URL {worker_url}: no other container of the pod declares port {u.port or 80}")
                is_agent = "guildhall-agent" in " ".join(str(x) for x in (c.get("command") or []) + (c.get("args") or [])) or "GUILDHALL_STAGE" in env or "GUILDHALL_STAGES" in env
                if is_agent:
                    timeout = parse_duration(env.get("GUILDHALL_SHUTDOWN_TIMEOUT") or "30s")
                    if timeout is None:
                        self.problem(cwhere, f"GUILDHALL_SHUTDOWN_TIMEOUT {env.get('GUILDHALL_SHUTDOWN_TIMEOUT')!r} is not a duration")
                    elif not (isinstance(grace, (int, float)) and grace > timeout):
                        self.problem(where, f"terminationGracePeriodSeconds ({grace}) must be longer than the agent's GUILDHALL_SHUTDOWN_TIMEOUT ({timeout:g} s), or the kubelet kills it while it finishes its tasks")
        self.check_k8s_services(deployments)
        self.check_k8s_servicemonitors()
        self.check_k8s_scaledobjects(deployments)
        self.check_kustomization()
        self.check_k8s_schemas()
        self.section("Kubernetes", before)

    def pods_selected(self, deployments, selector):
        out = []
        for rel, dep in deployments:
            labels = ((((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {})
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                out.append(dep)
        return out

    def check_k8s_services(self, deployments):
        for rel, svc in self.of_kind("Service"):
            where = f"{K8S}/{rel}: Service {svc['metadata']['name']}"
            spec = svc.get("spec") or {}
            selector = spec.get("selector") or {}
            if not selector:
                continue
            selected = self.pods_selected(deployments, selector)
            if not selected:
                self.problem(where, f"selects {format_labels(selector)}, which no Deployment's pod template has")
                continue
            ports = [p for dep in selected for c in ((dep["spec"]["template"].get("spec") or {}).get("containers") or []) for p in (c.get("ports") or [])]
            names = {p.get("name") for p in ports}
            numbers = {p.get("containerPort") for p in ports}
            for p in spec.get("ports") or []:
                target = p.get("targetPort", p.get("port"))
                if isinstance(target, str) and not target.isdigit():
                    if target not in names:
                        self.problem(where, f"port {p.get('name') or p.get('port')} targets {target!r}, which no selected container declares")
                elif int(target) not in numbers:
                    self.problem(where, f"port {p.get('name') or p.get('port')} targets {target}, which no selected container declares")

    def check_k8s_servicemonitors(self):
        services = self.of_kind("Service")
        for rel, sm in self.of_kind("ServiceMonitor"):
            where = f"{K8S}/{rel}: ServiceMonitor {sm['metadata']['name']}"
            spec = sm.get("spec") or {}
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            matched = [s for _, s in services if all(((s.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in sel.items())]
            if not matched:
                self.problem(where, f"selects Services labelled {format_labels(sel)}, and none here is")
                continue
            port_names = {p.get("name") for s in matched for p in ((s.get("spec") or {}).get("ports") or [])}
            for ep in spec.get("endpoints") or []:
                if ep.get("port") and ep["port"] not in port_names:
                    self.problem(where, f"endpoint port {ep['port']!r} is not a port name of the selected Service")

    def check_k8s_scaledobjects(self, deployments):
        by_name = {d["metadata"]["name"]: d for _, d in deployments}
        metrics = None
        for rel, so in self.of_kind("ScaledObject"):
            where = f"{K8S}/{rel}: ScaledObject {so['metadata']['name']}"
            spec = so.get("spec") or {}
            target_ref = spec.get("scaleTargetRef") or {}
            target = by_name.get(target_ref.get("name"))
            if target_ref.get("kind", "Deployment") != "Deployment" or target is None:
                self.problem(where, f"scaleTargetRef.name {target_ref.get('name')!r} is no Deployment in {K8S}")
            elif "replicas" in (target.get("spec") or {}):
                self.problem(where, f"Deployment {target_ref.get('name')} sets spec.replicas: every `kubectl apply` would reset what KEDA scaled; leave it out")
            fallback = spec.get("fallback")
            if not isinstance(fallback, dict) or "failureThreshold" not in fallback or "replicas" not in fallback:
                self.problem(where, "has no fallback (failureThreshold and replicas): when Prometheus or the coordinator is unreachable the stage keeps whatever count it had, or worse")
            prom = [t for t in spec.get("triggers") or [] if (t or {}).get("type") == "prometheus"]
            if not prom:
                self.problem(where, "has no prometheus trigger")
            for t in prom:
                md = t.get("metadata") or {}
                if md.get("ignoreNullValues") != "false":
                    self.problem(where, f"prometheus trigger: ignoreNullValues is {md.get('ignoreNullValues')!r}, must be the string \"false\": otherwise an empty result (coordinator down or restarting) counts as 0 and scales the stage down to minReplicaCount")
                if t.get("metricType", "AverageValue") != "AverageValue":
                    self.problem(where, f"prometheus trigger: metricType {t.get('metricType')} must be AverageValue: with threshold 1 the HPA then sets replicas = recommended workers, and KEDA's fallback only works for AverageValue")
                for key in ("serverAddress", "query", "threshold"):
                    if not md.get(key):
                        self.problem(where, f"prometheus trigger: metadata.{key} is missing")
                query = str(md.get("query") or "")
                used = set(METRIC_USE_RE.findall(query))
                if query and not used:
                    self.problem(where, "prometheus trigger: the query names no guildhall_* metric")
                if used:
                    if metrics is None:
                        metrics = self.metric_names() or set()
                    for m in sorted(used):
                        base = re.sub(r"_(bucket|sum|count)$", "", m)
                        if metrics and m not in metrics and base not in metrics:
                            self.problem(where, f"prometheus trigger: the query uses {m}, which {METRICS_RS} does not define")
                stage = re.search(r'\bstage\s*=\s*"([^"]+)"', query)
                if stage and target is not None:
                    served = self.stages_served(target)
                    if served and stage.group(1) not in served:
                        self.problem(where, f"prometheus trigger: the query is for stage {stage.group(1)!r}, but Deployment {target_ref.get('name')}'s agent serves {', '.join(sorted(served))}")

    @staticmethod
    def stages_served(dep):
        stages = set()
        pod = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            for e in (c or {}).get("env") or []:
                if e.get("name") == "GUILDHALL_STAGE" and e.get("value"):
                    stages.add(str(e["value"]))
                if e.get("name") == "GUILDHALL_STAGES" and e.get("value"):
                    stages |= {s.split(">")[0].strip() for s in str(e["value"]).split(",") if s.strip()}
        return stages

    def check_kustomization(self):
        rel = f"{K8S}/{KUSTOMIZATION}"
        k = self.load_yaml(rel)
        if k is None:
            return
        listed = [str(r) for r in (k or {}).get("resources") or []]
        present = {f for f in yaml_files(self.path(K8S)) if f != KUSTOMIZATION}
        for r in listed:
            if "://" in r:
                continue
            if not os.path.exists(self.path(f"{K8S}/{r}")):
                self.problem(rel, f"lists {r}, which does not exist")
        for f in sorted(present - set(listed)):
            self.problem(rel, f"does not list {f} (every YAML file in {K8S} must be a resource, or be removed)")
        if len(listed) != len(set(listed)):
            self.problem(rel, "lists a resource twice")
        images = {str(c.get("image", "")).rsplit("@", 1)[0] for _, _, c in self.k8s_containers()}
        image_names = {re.sub(r":[^/:]+$", "", i) for i in images}
        for im in (k or {}).get("images") or []:
            if (im or {}).get("name") not in image_names:
                self.problem(rel, f"images: {im.get('name')!r} matches no container image (images: {', '.join(sorted(image_names))}), so the override does nothing")
        if self.tools and shutil.which("kubectl"):
            r = subprocess.run(["kubectl", "kustomize", self.path(K8S)], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                self.problem(rel, "kubectl kustomize failed: " + one_line(r.stderr or r.stdout))
        elif self.tools:
            self.note("kubectl not installed: `kubectl kustomize` skipped")

    def check_k8s_schemas(self):
        if not self.tools:
            return
        tool = os.environ.get("KUBERNETES_VALIDATE") or shutil.which("kubernetes-validate")
        if not tool:
            self.note("kubernetes-validate not installed: Kubernetes schema validation skipped")
            return
        files = [self.path(f"{K8S}/{f}") for f in yaml_files(self.path(K8S)) if f != KUSTOMIZATION]
        if not files:
            return
        r = subprocess.run([tool, "--strict", "--quiet", "--no-warn", "-k", K8S_SCHEMA_VERSION] + files,
                           capture_output=True, text=True, timeout=300)
        errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("ERROR")]
        for line in errors:
            text = line[len("ERROR"):].strip().replace(self.root + "/", "")
            where, _, rest = text.partition(" ")
            if not where.startswith(K8S):
                where, rest = K8S, text
            self.problem(where, f"schema (Kubernetes {K8S_SCHEMA_VERSION}): {rest}")
        if r.returncode != 0 and not errors:
            self.problem(K8S, f"kubernetes-validate failed: {one_line(r.stderr or r.stdout)}")


# ----- small helpers -----


def host_port(port):
    """(host port, protocol) a compose `ports` entry publishes, or None
    (a container port only). Short syntax `[IP:]HOST:CONTAINER[/proto]`,
    the IP possibly a `${VAR:-default}`; long syntax with `published`."""
    if isinstance(port, dict):
        published = port.get("published")
        return (str(published), str(port.get("protocol", "tcp"))) if published else None
    text = re.sub(r"^\$\{[^}]*\}", "IP", str(port))
    text, _, proto = text.partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) < 2:
        return None
    return (parts[-2], proto or "tcp")


def one_line(text):
    return " ".join(str(text).split())


def doc_id(doc):
    return f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"


def format_labels(labels):
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "(nothing)"


def yaml_files(directory):
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.endswith((".yml", ".yaml")) and os.path.isfile(os.path.join(directory, f)))


def compiles(pattern):
    try:
        re.compile(pattern)
        return True
    except (re.error, TypeError):
        return False


def listen_port(value):
    """The port of a `HOST:PORT` listen address, or None."""
    m = re.fullmatch(r"\[?[^\]]*\]?:(\d+)", str(value or "").strip())
    return int(m.group(1)) if m else None


def parse_duration(text):
    """Seconds in a humantime-like duration (`30s`, `1m30s`, `500ms`), or
    None."""
    text = str(text).strip()
    if not text:
        return None
    total, pos = 0.0, 0
    for m in DURATION_PART_RE.finditer(text):
        if text[pos:m.start()].strip():
            return None
        value, unit = float(m.group(1)), m.group(2)
        total += value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def dockerfile_has_healthcheck(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    return any(re.match(r"\s*HEALTHCHECK\s+(?!NONE\b)", l, re.I) for l in text.splitlines())


def walk_strings(node, context=""):
    """(context, string) for every string in a parsed YAML/JSON tree; the
    context is the path of keys plus any `name` beside them."""
    if isinstance(node, dict):
        label = str(node.get("name", "")) if isinstance(node.get("name"), str) else ""
        for k, v in node.items():
            yield from walk_strings(v, f"{context}.{k}" + (f"[{label}]" if label and k != "name" else ""))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_strings(v, f"{context}[{i}]")
    elif isinstance(node, str):
        yield context.lstrip("."), node


def datasource_refs(dash):
    """(where, datasource value) for every `datasource` in a dashboard, in
    panels, nested rows, targets, templating and annotations."""
    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or node.get("refId")
            here = f"{where} {title!r}".strip() if title and isinstance(title, str) else where
            for k, v in node.items():
                if k == "datasource" and v is not None:
                    yield here or "dashboard", v
                else:
                    yield from walk(v, here)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, where)
    yield from walk(dash, "")


def password_matches(user, password):
    """Whether `password` is the user's password in the definitions
    (plain `password`, or `password_hash` with RabbitMQ's salted hashes)."""
    if "password" in user:
        return str(user["password"]) == password
    algo = user.get("hashing_algorithm", "rabbit_password_hashing_sha256")
    h = {"rabbit_password_hashing_sha256": hashlib.sha256,
         "rabbit_password_hashing_sha512": hashlib.sha512,
         "rabbit_password_hashing_md5": hashlib.md5}.get(algo)
    try:
        raw = base64.b64decode(str(user.get("password_hash", "")), validate=True)
    except ValueError:
        return False
    if h is None or len(raw) < 5:
        return True  # an algorithm this check cannot verify: not judged
    salt, digest = raw[:4], raw[4:]
    return h(salt + password.encode("utf-8")).digest() == digest


def rabbit_hash(password, salt=b"\x01\x02\x03\x04"):
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


# ----- self-test -----

FIXTURE = {
    COORDINATOR_CLI: '#[arg(long, env = "AMQP_URL")]\n#[arg(long, env = "GUILDHALL_LISTEN")]\n'
                     '#[arg(long, env = "GUILDHALL_MANAGEMENT_URL")]\n#[arg(long, env = "GUILDHALL_NAMESPACE")]\n'
                     '#[arg(\n    long,\n    env = "GUILDHALL_DATA_DIR",\n)]\n',
    AGENT_CLI: '#[arg(long, env = "GUILDHALL_STAGE")]\n#[arg(long, env = "GUILDHALL_NEXT")]\n'
               '#[arg(long, env = "GUILDHALL_WORKER_URL")]\n#[arg(long, env = "GUILDHALL_SHUTDOWN_TIMEOUT")]\n'
               '#[arg(long, env = "GUILDHALL_PROBE_LISTEN")]\n#[arg(long, env = "GUILDHALL_NAMESPACE")]\n',
    METRICS_RS: 'gauge_vec(&r, "guildhall_stage_recommended_workers", "help", &["stage"]),\n'
                'histogram(&r, "guildhall_task_duration_seconds", "help"),\n',
    DOCKERFILE: "FROM debian:bookworm-slim\nCOPY guildhall /usr/local/bin/\n"
                "HEALTHCHECK --interval=5s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1\n",
    "deploy/prometheus/alerts.yml": "groups: []\n",
    DASHBOARD: json.dumps({
        "uid": "guildhall",
        "annotations": {"list": [{"datasource": {"type": "grafana", "uid": "-- Grafana --"}}]},
        "templating": {"list": [{"name": "stage", "datasource": {"type": "prometheus", "uid": "prometheus"}}]},
        "panels": [
            {"type": "row", "title": "Fleet", "panels": [
                {"title": "Nested", "datasource": {"uid": "prometheus"},
                 "targets": [{"refId": "A", "datasource": {"uid": "prometheus"}, "expr": "up"}]}]},
            {"title": "Top", "datasource": {"uid": "${datasource}"}, "targets": [{"refId": "A", "expr": "up"}]},
        ],
    }),
    f"{GRAFANA_DATASOURCES}/prometheus.yml": "apiVersion: 1\ndatasources:\n  - name: Prometheus\n    uid: prometheus\n"
                                             "    type: prometheus\n    url: http://prometheus:9090\n",
    f"{GRAFANA_PROVIDERS}/guildhall.yml": "apiVersion: 1\nproviders:\n  - name: guildhall\n    type: file\n"
                                          "    options:\n      path: /var/lib/grafana/dashboards\n",
    PROMETHEUS: "rule_files:\n  - /etc/prometheus/alerts.yml\nscrape_configs:\n"
                "  - job_name: guildhall\n    static_configs:\n      - targets: ['coordinator:8080']\n"
                "  - job_name: rabbitmq\n    static_configs:\n      - targets: ['rabbitmq:15692']\n",
    DEFINITIONS: json.dumps({
        "users": [
            {"name": "admin", "password_hash": rabbit_hash("admin"), "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]},
            {"name": "coordinator", "password_hash": rabbit_hash("coordinator"), "tags": "monitoring"},
            {"name": "agent", "password_hash": rabbit_hash("agent"), "tags": ""},
            {"name": "producer", "password_hash": rabbit_hash("producer"), "tags": []},
        ],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                        for u in ("admin", "coordinator", "agent", "producer")],
        "topic_permissions": [],
        "policies": [{"vhost": "/", "name": "guildhall-events-stream", "pattern": r"^[A-Za-z0-9_-]+\.events$",
                      "apply-to": "queues", "definition": {"max-age": "7D"}}],
        "queues": [], "exchanges": [], "bindings": [],
    }),
    COMPOSE: """\
services:
  rabbitmq:
    image: rabbitmq:3-management
    volumes:
      - ./deploy/rabbitmq/definitions.json:/etc/rabbitmq/definitions.json:ro
    healthcheck:
      test: ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
  coordinator:
    image: guildhall:dev
    build:
      context: .
      dockerfile: deploy/Dockerfile
    command: ["guildhall", "serve"]
    environment:
      AMQP_URL: amqp://coordinator:coordinator@rabbitmq:5672/%2f
      GUILDHALL_MANAGEMENT_URL: http://coordinator:coordinator@rabbitmq:15672
      GUILDHALL_LISTEN: 0.0.0.0:8080
      GUILDHALL_DATA_DIR: /var/lib/guildhall
    volumes:
      - type: volume
        source: data
        target: /var/lib/guildhall
    depends_on:
      rabbitmq:
        condition: service_healthy
  pm_worker:
    image: guildhall:dev
    command: ["guildhall-agent"]
    environment:
      - AMQP_URL=amqp://agent:agent@rabbitmq:5672/%2f
      - GUILDHALL_STAGE=pm_worker
    depends_on:
      coordinator:
        condition: service_healthy
  prometheus:
    image: prom/prometheus
    volumes:
      - ./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro
      - type: bind
        source: ./deploy/prometheus/alerts.yml
        target: /etc/prometheus/alerts.yml
  grafana:
    image: grafana/grafana
    volumes:
      - ./deploy/grafana/provisioning:/etc/grafana/provisioning:ro
      - ./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro
    depends_on:
      - prometheus
  rabbit-1:
    image: rabbitmq:3.10-management
    profiles: [cluster]
    hostname: rabbit-1
    environment:
      RABBITMQ_ERLANG_COOKIE: secret-cookie
    volumes:
      - ./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/90-cluster.conf:ro
    ports:
      - "${HOST_IP:-127.0.0.1}:5673:5672"
    healthcheck:
      test: ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
  rabbit-2:
    image: rabbitmq:3.10-management
    profiles: [cluster]
    hostname: rabbit-2
    environment:
      RABBITMQ_ERLANG_COOKIE: secret-cookie
    volumes:
      - ./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/90-cluster.conf:ro
    ports:
      - "${HOST_IP:-127.0.0.1}:5674:5672"
  rabbit-3:
    image: rabbitmq:3.10-management
    profiles: [cluster]
    hostname: rabbit-3
    environment:
      - RABBITMQ_ERLANG_COOKIE=secret-cookie
    volumes:
      - ./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/90-cluster.conf:ro
    ports:
      - "5675:5672"
  cluster-coordinator:
    image: guildhall:dev
    profiles: [cluster]
    command: ["guildhall", "serve"]
    environment:
      AMQP_URL: amqp://coordinator:coordinator@rabbit-1:5672/%2f,amqp://coordinator:coordinator@rabbit-2:5672/%2f,amqp://coordinator:coordinator@rabbit-3:5672/%2f
      GUILDHALL_MANAGEMENT_URL: http://coordinator:coordinator@rabbit-1:15672,http://coordinator:coordinator@rabbit-2:15672
    ports:
      - target: 8080
        published: 8081
    depends_on:
      rabbit-1:
        condition: service_healthy
      pm_worker:
        condition: service_started
volumes:
  data: {}
""",
    "deploy/rabbitmq/cluster.conf": "cluster_formation.peer_discovery_backend = classic_config\n"
                                    "cluster_formation.classic_config.nodes.1 = rabbit@rabbit-1\n"
                                    "cluster_formation.classic_config.nodes.2 = rabbit@rabbit-2 # a comment\n"
                                    "cluster_formation.classic_config.nodes.3 = rabbit@rabbit-3\n"
                                    "cluster_partition_handling = pause_minority\n",
    f"{K8S}/{KUSTOMIZATION}": "resources:\n  - secret.yaml\n  - apps.yaml\nimages:\n  - name: guildhall\n    newTag: dev\n",
    f"{K8S}/secret.yaml": """\
apiVersion: v1
kind: Secret
metadata:
  name: amqp
stringData:
  agent-amqp-url: amqp://agent:agent@rabbitmq:5672/%2f
data:
  management-url: aHR0cDovL2Nvb3JkaW5hdG9yOmNvb3JkaW5hdG9yQHJhYmJpdG1xOjE1Njcy
""",
    f"{K8S}/apps.yaml": """\
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coordinator
spec:
  selector:
    matchLabels: {app: coordinator}
  template:
    metadata:
      labels: {app: coordinator, tier: control}
    spec:
      containers:
        - name: coordinator
          image: guildhall:dev
          args: [serve]
          ports: [{name: http, containerPort: 8080}]
          env:
            - {name: GUILDHALL_LISTEN, value: "0.0.0.0:8080"}
            - name: GUILDHALL_MANAGEMENT_URL
              valueFrom: {secretKeyRef: {name: amqp, key: management-url}}
          livenessProbe: {httpGet: {path: /healthz, port: http}}
          readinessProbe: {httpGet: {path: /healthz, port: 8080}}
          volumeMounts: [{name: data, mountPath: /var/lib/guildhall}]
      volumes:
        - name: data
          persistentVolumeClaim: {claimName: data}
---
apiVersion: v1
kind: Service
metadata:
  name: coordinator
  labels: {app: coordinator}
spec:
  selector: {app: coordinator}
  ports: [{name: http, port: 8080, targetPort: http}]
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: coordinator
spec:
  selector: {matchLabels: {app: coordinator}}
  endpoints: [{port: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: pm-worker
spec:
  selector:
    matchLabels: {app: pm-worker}
  template:
    metadata:
      labels: {app: pm-worker}
    spec:
      terminationGracePeriodSeconds: 45
      containers:
        - name: worker
          image: example.com/worker:1
          ports: [{name: http, containerPort: 8000}]
          livenessProbe: {httpGet: {path: /health, port: http}}
        - name: agent
          image: guildhall:dev
          command: [guildhall-agent]
          ports: [{name: probes, containerPort: 9100}]
          env:
            - name: AMQP_URL
              valueFrom: {secretKeyRef: {name: amqp, key: agent-amqp-url}}
            - {name: GUILDHALL_STAGE, value: pm_worker}
            - {name: GUILDHALL_WORKER_URL, value: "http://127.0.0.1:8000/"}
            - {name: GUILDHALL_SHUTDOWN_TIMEOUT, value: 30s}
            - {name: GUILDHALL_PROBE_LISTEN, value: "0.0.0.0:9100"}
          livenessProbe: {httpGet: {path: /livez, port: probes}}
          readinessProbe: {httpGet: {path: /readyz, port: probes}}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: pm-worker
spec:
  scaleTargetRef: {name: pm-worker}
  fallback: {failureThreshold: 3, replicas: 2}
  triggers:
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: http://prometheus:9090
        query: max(guildhall_stage_recommended_workers{stage="pm_worker"})
        threshold: "1"
        ignoreNullValues: "false"
""",
}


def _edit(rel, old, new, count=1):
    def apply(root):
        p = os.path.join(root, rel)
        with open(p, encoding="utf-8") as f:
            text = f.read()
        if old not in text:
            raise AssertionError(f"self-test fixture: {old!r} not in {rel}")
        with open(p, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new, count))
    return apply


def _write(rel, text):
    def apply(root):
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    return apply


def _remove(rel):
    return lambda root: os.remove(os.path.join(root, rel))


def _json_edit(rel, fn):
    def apply(root):
        p = os.path.join(root, rel)
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        fn(d)
        with open(p, "w", encoding="utf-8") as f:
            json.dump(d, f)
    return apply


def _set_dashboard_nested_uid(d):
    d["panels"][0]["panels"][0]["targets"][0]["datasource"]["uid"] = "promethues"


# (name, breakage, text the report must contain)
BREAKAGES = [
    ("compose: invalid YAML", _write(COMPOSE, "services: [\n"), f"{COMPOSE}: is not valid YAML"),
    ("compose: short bind mount of a missing path", _edit(COMPOSE, "./deploy/rabbitmq/definitions.json:", "./deploy/rabbitmq/definition.json:"), "bind-mounted host path ./deploy/rabbitmq/definition.json does not exist"),
    ("compose: long bind mount of a missing path", _edit(COMPOSE, "source: ./deploy/prometheus/alerts.yml", "source: ./deploy/prometheus/alert.yml"), "bind-mounted host path ./deploy/prometheus/alert.yml does not exist"),
    ("compose: missing build.dockerfile", _edit(COMPOSE, "dockerfile: deploy/Dockerfile", "dockerfile: deploy/Dockerfile.missing"), "build.dockerfile deploy/Dockerfile.missing does not exist"),
    ("compose: service_healthy on a service without healthcheck", _edit(COMPOSE, "    healthcheck:\n      test: [\"CMD\", \"rabbitmq-diagnostics\", \"-q\", \"ping\"]\n", ""), "waits for rabbitmq with condition service_healthy, but rabbitmq has no healthcheck"),
    ("compose: service_healthy on the guildhall image without HEALTHCHECK", _edit(DOCKERFILE, "HEALTHCHECK --interval=5s", "# no health check:"), "waits for coordinator with condition service_healthy, but coordinator has no healthcheck"),
    ("compose: depends_on an unknown service", _edit(COMPOSE, "    depends_on:\n      - prometheus", "    depends_on:\n      - prometheus2"), "depends_on names service prometheus2, which does not exist"),
    ("compose: depends on a service of a profile it does not run with", _edit(COMPOSE, "    depends_on:\n      - prometheus", "    depends_on:\n      - rabbit-2"), "depends on rabbit-2, which runs only with profile cluster, but grafana runs without any profile"),
    ("compose: two services publish one host port", _edit(COMPOSE, '"${HOST_IP:-127.0.0.1}:5674:5672"', '"5673:5672"'), "publishes host port 5673/tcp, which service rabbit-1 publishes too"),
    ("compose: long-syntax port published twice", _edit(COMPOSE, '"5675:5672"', '"8081:5672"'), "publishes host port 8081/tcp, which service"),
    ("compose: a URL list names a host that is no service", _edit(COMPOSE, "coordinator@rabbit-3:5672", "coordinator@rabbit-4:5672"), "amqp URL names host rabbit-4, which is no compose service"),
    ("rabbitmq: wrong password in a URL list's second entry", _edit(COMPOSE, "coordinator:coordinator@rabbit-2:15672", "coordinator:secret@rabbit-2:15672"), "management URL: the password for user 'coordinator' is not the one"),
    ("rabbitmq cluster: a listed node is no service", _edit(COMPOSE, "hostname: rabbit-3", "hostname: rabbit-03"), "lists rabbit@rabbit-3, which is no service's node name"),
    ("rabbitmq cluster: a node without hostname", _edit(COMPOSE, "    hostname: rabbit-2\n", ""), "service rabbit-2 sets no hostname"),
    ("rabbitmq cluster: different Erlang cookies", _edit(COMPOSE, "RABBITMQ_ERLANG_COOKIE=secret-cookie", "RABBITMQ_ERLANG_COOKIE=other-cookie"), "do not all set the same RABBITMQ_ERLANG_COOKIE"),
    ("rabbitmq cluster: partitions not paused", _edit("deploy/rabbitmq/cluster.conf", "cluster_partition_handling = pause_minority", "cluster_partition_handling = autoheal"), "cluster_partition_handling is autoheal, not pause_minority"),
    ("env: unknown GUILDHALL_* in compose", _edit(COMPOSE, "GUILDHALL_DATA_DIR: /var", "GUILDHALL_DATADIR: /var"), "sets GUILDHALL_DATADIR, which neither binary reads"),
    ("env: unknown GUILDHALL_* in k8s", _edit(f"{K8S}/apps.yaml", "GUILDHALL_PROBE_LISTEN", "GUILDHALL_PROBES_LISTEN"), "sets GUILDHALL_PROBES_LISTEN, which neither binary reads"),
    ("grafana: dashboard is not JSON", _write(DASHBOARD, "{ not json"), f"{DASHBOARD}: is not valid JSON"),
    ("grafana: unknown datasource uid in a nested row's target", _json_edit(DASHBOARD, _set_dashboard_nested_uid), "datasource uid 'promethues' is not provisioned"),
    ("grafana: unknown datasource uid in templating", _json_edit(DASHBOARD, lambda d: d["templating"]["list"][0]["datasource"].update(uid="prom")), "datasource uid 'prom' is not provisioned"),
    ("grafana: provider path not mounted", _edit(f"{GRAFANA_PROVIDERS}/guildhall.yml", "/var/lib/grafana/dashboards", "/var/lib/grafana/dash"), "no compose service mounts anything at /var/lib/grafana/dash"),
    ("grafana: provider path mounted from elsewhere", _edit(COMPOSE, "./deploy/grafana/dashboards:/var/lib/grafana/dashboards", "./deploy/grafana:/var/lib/grafana/dashboards"), "compose mounts deploy/grafana (service grafana) at /var/lib/grafana/dashboards, not deploy/grafana/dashboards"),
    ("grafana: datasource host is no compose service", _edit(f"{GRAFANA_DATASOURCES}/prometheus.yml", "http://prometheus:9090", "http://prom:9090"), "names host prom, which is no compose service"),
    ("rabbitmq: definitions are not JSON", _write(DEFINITIONS, "{"), f"{DEFINITIONS}: is not valid JSON"),
    ("rabbitmq: permission for an unknown user", _json_edit(DEFINITIONS, lambda d: d["permissions"].append({"user": "ghost", "vhost": "/", "configure": "", "write": "", "read": ""})), "permissions: user 'ghost' is not defined"),
    ("rabbitmq: topic permission on an unknown vhost", _json_edit(DEFINITIONS, lambda d: d["topic_permissions"].append({"user": "agent", "vhost": "/x", "exchange": "", "write": ".*", "read": ".*"})), "topic_permissions: vhost '/x' is not defined"),
    ("rabbitmq: policy on an unknown vhost", _json_edit(DEFINITIONS, lambda d: d["policies"][0].update(vhost="guildhall")), "policy 'guildhall-events-stream': vhost 'guildhall' is not defined"),
    ("rabbitmq: unknown user tag", _json_edit(DEFINITIONS, lambda d: d["users"][1].update(tags="monitor")), "unknown tag 'monitor'"),
    ("rabbitmq: compose URL user not defined", _edit(COMPOSE, "amqp://agent:agent@", "amqp://worker:agent@"), "uses RabbitMQ user 'worker'"),
    ("rabbitmq: k8s URL user not defined", _edit(f"{K8S}/secret.yaml", "amqp://agent:agent@", "amqp://agents:agent@"), "uses RabbitMQ user 'agents'"),
    ("rabbitmq: wrong password in a URL", _edit(COMPOSE, "amqp://coordinator:coordinator@", "amqp://coordinator:secret@"), "the password for user 'coordinator' is not the one"),
    ("rabbitmq: management user without a management tag", _json_edit(DEFINITIONS, lambda d: d["users"][1].update(tags="")), "give no management API access"),
    ("rabbitmq: AMQP user without permissions on the vhost", _json_edit(DEFINITIONS, lambda d: d.update(permissions=[p for p in d["permissions"] if p["user"] != "agent"])), "user 'agent' has no permissions on vhost '/'"),
    ("rabbitmq: policy pattern does not compile", _json_edit(DEFINITIONS, lambda d: d["policies"][0].update(pattern="^(guildhall")), "pattern '^(guildhall' does not compile"),
    ("rabbitmq: stream policy misses the events stream", _json_edit(DEFINITIONS, lambda d: d["policies"][0].update(pattern=r"^guildhall\.event$")), "no stream policy matches the events stream guildhall.events"),
    ("prometheus: target is no compose service", _edit(PROMETHEUS, "coordinator:8080", "guildhall:8080"), "target guildhall:8080 names host guildhall, which is no compose service"),
    ("prometheus: target port is not the coordinator's", _edit(COMPOSE, "GUILDHALL_LISTEN: 0.0.0.0:8080", "GUILDHALL_LISTEN: 0.0.0.0:8081"), "target coordinator:8080, but service coordinator listens on port 8081"),
    ("prometheus: rule file not mounted", _edit(PROMETHEUS, "/etc/prometheus/alerts.yml", "/etc/prometheus/rules.yml"), "rule file /etc/prometheus/rules.yml: no compose service mounts anything there"),
    ("k8s: invalid YAML", _write(f"{K8S}/apps.yaml", "kind: [\n"), f"{K8S}/apps.yaml: is not valid YAML"),
    ("k8s: document without metadata.name", _edit(f"{K8S}/apps.yaml", "metadata:\n  name: data\n", "metadata: {}\n"), "has no metadata.name"),
    ("k8s: selector not in template labels", _edit(f"{K8S}/apps.yaml", "matchLabels: {app: coordinator}\n  template", "matchLabels: {app: coord}\n  template"), "selector app=coord is not among the pod template's labels"),
    ("k8s: container without image", _edit(f"{K8S}/apps.yaml", "          image: example.com/worker:1\n", ""), "container worker: needs a name and an image"),
    ("k8s: probe on an undeclared port name", _edit(f"{K8S}/apps.yaml", "path: /livez, port: probes", "path: /livez, port: probe"), "livenessProbe uses port 'probe', which the container does not declare"),
    ("k8s: probe on an undeclared port number", _edit(f"{K8S}/apps.yaml", "path: /healthz, port: 8080", "path: /healthz, port: 8081"), "readinessProbe uses port 8081, which the container does not declare"),
    ("k8s: Service selects no pods", _edit(f"{K8S}/apps.yaml", "  selector: {app: coordinator}\n  ports", "  selector: {app: coordinatr}\n  ports"), "selects app=coordinatr, which no Deployment's pod template has"),
    ("k8s: Service targets a missing port", _edit(f"{K8S}/apps.yaml", "targetPort: http", "targetPort: web"), "targets 'web', which no selected container declares"),
    ("k8s: secretKeyRef to a missing key", _edit(f"{K8S}/apps.yaml", "key: agent-amqp-url", "key: amqp-url"), "reads key amqp-url of Secret amqp, which it does not have"),
    ("k8s: grace period not longer than the shutdown timeout", _edit(f"{K8S}/apps.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30"), "terminationGracePeriodSeconds (30) must be longer than the agent's GUILDHALL_SHUTDOWN_TIMEOUT (30 s)"),
    ("k8s: listen address on an undeclared port", _edit(f"{K8S}/apps.yaml", '{name: GUILDHALL_PROBE_LISTEN, value: "0.0.0.0:9100"}', '{name: GUILDHALL_PROBE_LISTEN, value: "0.0.0.0:9101"}'), "GUILDHALL_PROBE_LISTEN=0.0.0.0:9101 listens on port 9101, which the container does not declare"),
    ("k8s: worker URL on a port no container declares", _edit(f"{K8S}/apps.yaml", '"http://127.0.0.1:8000/"', '"http://127.0.0.1:8001/"'), "GUILDHALL_WORKER_URL http://127.0.0.1:8001/: no other container of the pod declares port 8001"),
    ("k8s: ServiceMonitor port is not the Service's", _edit(f"{K8S}/apps.yaml", "endpoints: [{port: http}]", "endpoints: [{port: metrics}]"), "endpoint port 'metrics' is not a port name"),
    ("k8s: ScaledObject targets no Deployment", _edit(f"{K8S}/apps.yaml", "scaleTargetRef: {name: pm-worker}", "scaleTargetRef: {name: pm_worker}"), "scaleTargetRef.name 'pm_worker' is no Deployment"),
    ("k8s: ScaledObject with ignoreNullValues true", _edit(f"{K8S}/apps.yaml", 'ignoreNullValues: "false"', 'ignoreNullValues: "true"'), "ignoreNullValues is 'true', must be the string \"false\""),
    ("k8s: ScaledObject with ignoreNullValues unset", _edit(f"{K8S}/apps.yaml", '        ignoreNullValues: "false"\n', ""), "ignoreNullValues is None"),
    ("k8s: ScaledObject without fallback", _edit(f"{K8S}/apps.yaml", "  fallback: {failureThreshold: 3, replicas: 2}\n", ""), "has no fallback"),
    ("k8s: ScaledObject with metricType Value", _edit(f"{K8S}/apps.yaml", "metricType: AverageValue", "metricType: Value"), "metricType Value must be AverageValue"),
    ("k8s: ScaledObject query on an unknown metric", _edit(f"{K8S}/apps.yaml", "guildhall_stage_recommended_workers{", "guildhall_stage_recommended_worker{"), "the query uses guildhall_stage_recommended_worker, which"),
    ("k8s: ScaledObject query for another stage", _edit(f"{K8S}/apps.yaml", '{stage="pm_worker"}', '{stage="pm-worker"}'), "the query is for stage 'pm-worker', but Deployment pm-worker's agent serves pm_worker"),
    ("k8s: ScaledObject target sets replicas", _edit(f"{K8S}/apps.yaml", "  name: pm-worker\nspec:\n  selector:", "  name: pm-worker\nspec:\n  replicas: 2\n  selector:"), "sets spec.replicas"),
    ("k8s: kustomization misses a file", _write(f"{K8S}/extra.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\n"), "does not list extra.yaml"),
    ("k8s: kustomization lists a missing file", _remove(f"{K8S}/secret.yaml"), "lists secret.yaml, which does not exist"),
    ("k8s: kustomize image override matches nothing", _edit(f"{K8S}/{KUSTOMIZATION}", "name: guildhall\n", "name: ghcr.io/x/guildhall\n"), "matches no container image"),
    ("sources: env declarations missing", _remove(AGENT_CLI), f"{AGENT_CLI}: missing"),
]


def _kubernetes_validate():
    return os.environ.get("KUBERNETES_VALIDATE") or shutil.which("kubernetes-validate")


# Breakages only an external tool catches: run when the tool is installed.
TOOL_BREAKAGES = [
    ("docker-compose", lambda: shutil.which("docker-compose"),
     _edit(COMPOSE, "  rabbitmq:\n    image:", "  rabbitmq:\n    imagee:"), "docker-compose config -q failed"),
    ("kubernetes-validate", _kubernetes_validate,
     _edit(f"{K8S}/apps.yaml", "      terminationGracePeriodSeconds: 45", "      terminationGracePeriodSecond: 45"), "schema (Kubernetes"),
    ("kubectl kustomize", lambda: shutil.which("kubectl"),
     _edit(f"{K8S}/{KUSTOMIZATION}", "images:", "imagez:"), "kubectl kustomize failed"),
]


def make_fixture(root):
    for rel, text in FIXTURE.items():
        _write(rel, text)(root)


def self_test():
    failed = 0
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        good = os.path.join(tmp, "good")
        make_fixture(good)
        problems = Checker(good, tools=False).run()
        if problems:
            failed += 1
            print("FAIL valid fixture: expected no problem, got:")
            for p in problems:
                print("    " + p)
        else:
            print("ok   valid fixture passes")
        for i, (name, breakage, expected) in enumerate(BREAKAGES):
            root = os.path.join(tmp, f"case{i}")
            make_fixture(root)
            breakage(root)
            problems = Checker(root, tools=False).run()
            if any(expected in p for p in problems):
                print(f"ok   {name}")
            else:
                failed += 1
                print(f"FAIL {name}: expected a problem containing {expected!r}, got:")
                for p in problems or ["(no problem)"]:
                    print("    " + p)
        total = len(BREAKAGES) + 1
        tools = [t for t in TOOL_BREAKAGES if t[1]()]
        for tool, available, _, _ in TOOL_BREAKAGES:
            if not available():
                print(f"skip {tool}: not installed")
        if tools:
            total += 1
            root = os.path.join(tmp, "good-tools")
            make_fixture(root)
            problems = Checker(root, tools=True).run()
            if problems:
                failed += 1
                print("FAIL valid fixture with the tools: expected no problem, got:")
                for p in problems:
                    print("    " + p)
            else:
                print(f"ok   valid fixture passes {', '.join(t[0] for t in tools)}")
        for i, (tool, _, breakage, expected) in enumerate(tools):
            total += 1
            root = os.path.join(tmp, f"tool{i}")
            make_fixture(root)
            breakage(root)
            problems = Checker(root, tools=True).run()
            if any(expected in p for p in problems):
                print(f"ok   {tool} catches its breakage")
            else:
                failed += 1
                print(f"FAIL {tool}: expected a problem containing {expected!r}, got:")
                for p in problems or ["(no problem)"]:
                    print("    " + p)
    print(f"self-test: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="repository root to check (default: this script's repository)")
    ap.add_argument("--self-test", action="store_true", help="check that every check catches its broken fixture")
    ap.add_argument("--no-tools", action="store_true", help="skip docker-compose, kubectl and kubernetes-validate")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    checker = Checker(args.root, tools=not args.no_tools)
    problems = checker.run()
    for n in checker.notes:
        print(f"note: {n}")
    for p in problems:
        print(p)
    if problems:
        print(f"check-deploy: {len(problems)} problem(s); sections without problems: {', '.join(checker.passed) or 'none'}")
        return 1
    print(f"check-deploy: ok ({', '.join(checker.passed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
