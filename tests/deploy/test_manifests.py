"""The deployment files agree with each other and with the repository, without Docker.

Every YAML file under deploy/ parses; the compose file's builds, mounts and ports point at
files and ports that exist; the Kubernetes manifests are complete and their ports, names and
selectors line up; the sidecar's config validates with the daemon's own config loader; the
Dockerfiles copy only files the build context (.dockerignore) lets in.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from monitor.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
#: where the image's ENTRYPOINT reads its config (and where a ConfigMap must put config.yaml)
IMAGE_CONFIG_PATH = "/etc/lrpilot/config.yaml"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.y*ml")) for doc in _load_all(path)]


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _k8s_docs() if doc["kind"] == kind]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in _all_containers(pod) if c["name"] == "lrpilot"]
    return sidecar


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _default_config_port() -> int:
    return load_config(ROOT / "config.yaml", environ={}).server.port


# ------------------------------------------------------------------------------------ YAML


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_deploy_yaml_parses(path: Path) -> None:
    """Each YAML file under deploy/ is valid YAML with at least one mapping document."""
    docs = _load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


def test_deploy_has_the_expected_files() -> None:
    """The files deploy/README.md describes exist."""
    for name in (
        "README.md",
        "docker-compose.yml",
        "prometheus.yml",
        "train.Dockerfile",
        "example-train.py",
        "healthcheck.py",
        "kubernetes/job.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/service.yaml",
        "kubernetes/servicemonitor.yaml",
        "kubernetes/secret.yaml",
    ):
        assert (DEPLOY / name).is_file(), name


# ------------------------------------------------------------------------------------ compose


def _bind_sources(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are skipped."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            yield (DEPLOY / source).resolve(), target


def _container_port(service: dict[str, Any]) -> list[int]:
    return [int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])]


def test_compose_has_job_sidecar_prometheus_and_grafana() -> None:
    """Four services: the training job, the lrpilot sidecar, Prometheus and Grafana."""
    assert set(_compose()["services"]) == {"train", "lrpilot", "prometheus", "grafana"}


def test_compose_builds_point_at_dockerfiles_that_exist() -> None:
    """Each build's context is a directory and its dockerfile exists inside it."""
    services = _compose()["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) == {"train", "lrpilot"}
    for name, service in built.items():
        context = (DEPLOY / service["build"]["context"]).resolve()
        dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
        assert context == ROOT, name
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
    assert built["lrpilot"]["build"].get("dockerfile", "Dockerfile") == "Dockerfile"


def test_compose_third_party_images_are_pinned() -> None:
    """Prometheus and Grafana images name a version, never an implicit latest."""
    for name in ("prometheus", "grafana"):
        image = _compose()["services"][name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: {image}"


def test_compose_bind_mounts_refer_to_repository_files() -> None:
    """Every bind-mounted host path exists in the repository; named volumes are declared."""
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: {source} -> {path}"
                assert ROOT in path.parents or path == ROOT, f"{name}: {source} is outside the repository"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"


def test_compose_sidecar_port_matches_daemon_config_and_scrape_target() -> None:
    """The daemon's port (config.yaml) is published, scraped by Prometheus, and in the job's URL."""
    port = _default_config_port()
    services = _compose()["services"]
    assert _container_port(services["lrpilot"]) == [port]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"lrpilot:{port}"]
    train = services["train"]
    assert train["network_mode"] == "service:lrpilot"  # localhost is the sidecar
    url = urlsplit(train["environment"]["LRPILOT_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("ws", "127.0.0.1", port, "/ws")
    assert train["depends_on"]["lrpilot"]["condition"] == "service_healthy"


def test_compose_job_token_is_one_the_daemon_accepts() -> None:
    """The job presents the same token the daemon is given (Prometheus needs a token configured)."""
    services = _compose()["services"]
    daemon_env = services["lrpilot"]["environment"]
    assert daemon_env["LRPILOT_JOB_TOKEN"] == services["train"]["environment"]["LRPILOT_TOKEN"]
    assert daemon_env["LRPILOT_AUTH_TOKEN"]


def test_compose_prometheus_mounts_its_config_and_the_alert_rules() -> None:
    """prometheus.yml and every rule file it names are mounted where it looks for them."""
    service = _compose()["services"]["prometheus"]
    mounts = {target: source for source, target in _bind_sources(service)}
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in prometheus["rule_files"]:
        assert rule_file in mounts, rule_file
        assert mounts[rule_file].is_file()
        assert "groups" in yaml.safe_load(mounts[rule_file].read_text(encoding="utf-8"))


def test_compose_grafana_provisioning_paths_line_up() -> None:
    """Grafana gets the provisioning dirs, and the dashboards where the provider file says."""
    services = _compose()["services"]
    mounts = {target: source for source, target in _bind_sources(services["grafana"])}
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    dashboards_provisioning = mounts["/etc/grafana/provisioning/dashboards"]
    assert datasources == ROOT / "dashboards/provisioning/datasources"
    assert dashboards_provisioning == ROOT / "dashboards/provisioning/dashboards"
    for directory in (datasources, dashboards_provisioning):
        assert list(directory.glob("*.yaml")), directory
    providers = [
        p
        for f in dashboards_provisioning.glob("*.yaml")
        for p in yaml.safe_load(f.read_text(encoding="utf-8"))["providers"]
    ]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"provider path {path} is not mounted"
        jsons = sorted(mounts[path].glob("*.json"))
        assert jsons, f"no dashboards in {mounts[path]}"
        for dashboard in jsons:
            assert json.loads(dashboard.read_text(encoding="utf-8"))["uid"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    directory, _, name = home.rpartition("/")
    assert (mounts[directory] / name).is_file(), home
    # the provisioned data source reaches the prometheus service on its port
    for f in datasources.glob("*.yaml"):
        for source in yaml.safe_load(f.read_text(encoding="utf-8"))["datasources"]:
            url = urlsplit(source["url"])
            assert url.hostname in services, source["url"]
            assert url.port in _container_port(services[url.hostname]), source["url"]


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` (the compose plugin) validates the file, when it is installed."""
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose version` failed)")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=DEPLOY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------ kubernetes


def test_k8s_documents_have_api_version_kind_and_name() -> None:
    """Every Kubernetes document names its apiVersion, kind and metadata.name."""
    docs = _k8s_docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret", "Job", "Service", "ServiceMonitor"}
    for doc in docs:
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
    (monitor,) = _k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"


def test_k8s_containers_have_names_images_and_a_native_sidecar() -> None:
    """Each container has a unique name and an image; lrpilot is a restartable init container."""
    (job,) = _k8s("Job")
    pod = _pod_spec(job)
    containers = _all_containers(pod)
    names = [c["name"] for c in containers]
    assert len(names) == len(set(names))
    for container in containers:
        assert container["name"] and container["image"], container
    assert [c["name"] for c in pod["containers"]] == ["train"]
    assert _sidecar(pod)["restartPolicy"] == "Always"
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def test_k8s_sidecar_port_matches_annotation_url_config_and_probes() -> None:
    """The sidecar's port is the scrape annotation's, the job's LRPILOT_URL's and config.yaml's."""
    (job,) = _k8s("Job")
    pod = _pod_spec(job)
    sidecar = _sidecar(pod)
    (port_spec,) = sidecar["ports"]
    port = port_spec["containerPort"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    (train,) = pod["containers"]
    url = urlsplit(_env(train)["LRPILOT_URL"]["value"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("ws", "127.0.0.1", port, "/ws")
    assert _configmap_config().server.port == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["port"] in (port, port_spec["name"]), probe
        assert get["path"] in ("/healthz", "/readyz"), probe


def _configmap_config_text() -> str:
    (configmap,) = _k8s("ConfigMap")
    text: str = configmap["data"]["config.yaml"]
    return text


def _configmap_config(environ: dict[str, str] | None = None) -> Any:
    """The ConfigMap's config.yaml through load_config, from a file as the daemon reads it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_text(_configmap_config_text(), encoding="utf-8")
        return load_config(path, environ=environ or {})


def test_k8s_configmap_config_validates_and_is_reachable_by_probes_and_prometheus() -> None:
    """The ConfigMap's config.yaml passes monitor.config; it binds 0.0.0.0 and keeps state in the volume."""
    config = _configmap_config()
    assert config.server.host == "0.0.0.0"
    (job,) = _k8s("Job")
    sidecar = _sidecar(_pod_spec(job))
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert Path(config.storage.state_dir).is_relative_to(mounts["state"])
    # the kubelet and Prometheus are not loopback peers: the daemon answers them only with a token
    env = _env(sidecar)
    assert "LRPILOT_JOB_TOKEN" in env and "LRPILOT_AUTH_TOKEN" in env
    with_tokens = _configmap_config({"LRPILOT_JOB_TOKEN": "x" * 16, "LRPILOT_AUTH_TOKEN": "y" * 16})
    assert {t.role for t in with_tokens.all_tokens()} == {"job", "admin"}


def test_k8s_configmap_is_mounted_where_the_image_reads_its_config() -> None:
    """The ConfigMap volume lands config.yaml on the image's --config path (a directory mount)."""
    (configmap,) = _k8s("ConfigMap")
    (job,) = _k8s("Job")
    pod = _pod_spec(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in _sidecar(pod)["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    assert f"{mount['mountPath']}/config.yaml" == IMAGE_CONFIG_PATH
    assert IMAGE_CONFIG_PATH in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_k8s_secret_refs_name_keys_of_the_secret() -> None:
    """Every secretKeyRef names the Secret in secret.yaml and one of its keys."""
    (secret,) = _k8s("Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    (job,) = _k8s("Job")
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for c in _all_containers(_pod_spec(job))
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert len(refs) == 3
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in keys
    (train,) = _pod_spec(job)["containers"]
    sidecar = _sidecar(_pod_spec(job))
    job_token = _env(train)["LRPILOT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert job_token == _env(sidecar)["LRPILOT_JOB_TOKEN"]["valueFrom"]["secretKeyRef"]


def test_k8s_service_and_servicemonitor_select_the_sidecar() -> None:
    """Service selects the job's pods on the sidecar's port; the ServiceMonitor selects the Service."""
    (job,) = _k8s("Job")
    (service,) = _k8s("Service")
    (monitor,) = _k8s("ServiceMonitor")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    for key, value in service["spec"]["selector"].items():
        assert pod_labels.get(key) == value, key
    (port_spec,) = _sidecar(_pod_spec(job))["ports"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port_spec["name"], port_spec["containerPort"])
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"].get(key) == value, key
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"


def test_k8s_pods_run_as_the_images_non_root_user() -> None:
    """The pod runs as uid 10001, the user the Dockerfiles create, with fsGroup for the volume."""
    (job,) = _k8s("Job")
    security = _pod_spec(job)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["fsGroup"] == 10001
    for dockerfile in ("Dockerfile", "deploy/train.Dockerfile"):
        assert "--uid 10001" in (ROOT / dockerfile).read_text(encoding="utf-8"), dockerfile


# ------------------------------------------------------------------------------------ Dockerfiles


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _in_build_context(relative: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path, or a parent of it, wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, pattern in _dockerignore_patterns():
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], pattern)
               for c in candidates):  # fmt: skip
            included = negated
    return included


def _tracked_files(relative: str) -> list[str]:
    """The repository's files at or under ``relative`` (git's list, so build leftovers such as
    *.egg-info do not count; every file on disk when git is unavailable)."""
    if shutil.which("git") is not None:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", relative],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if listed.returncode == 0:
            return listed.stdout.split()
    path = ROOT / relative
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [f.relative_to(ROOT).as_posix() for f in files if "__pycache__" not in f.parts]


def _copy_sources(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    sources: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/train.Dockerfile"])
def test_dockerfile_copies_files_the_build_context_includes(dockerfile: str) -> None:
    """Each COPY source exists and .dockerignore lets it (and all files under it) in."""
    sources = _copy_sources(ROOT / dockerfile)
    assert sources
    for source in sources:
        if "*" in source:
            continue  # optional files (README.md*): present or not, the build works
        path = ROOT / source.rstrip("/")
        assert path.exists(), f"{dockerfile}: COPY {source}: missing"
        files = _tracked_files(source.rstrip("/"))
        assert files, f"{dockerfile}: COPY {source}: no file of the repository there"
        for relative in files:
            assert _in_build_context(relative), f"{dockerfile}: {relative} is excluded by .dockerignore"


def test_dockerignore_keeps_the_virtualenv_and_git_out() -> None:
    """The heavy and irrelevant parts of a checkout never reach the build context."""
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_lint.py", "bench/run_all.py", "lrpilot-state/x"):
        assert not _in_build_context(path), path


def test_dockerfile_runs_the_daemon_as_non_root_with_healthcheck_and_port() -> None:
    """Non-root USER, exec-form ENTRYPOINT, EXPOSE of the configured port, a python HEALTHCHECK."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in text.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    by_name: dict[str, list[str]] = {}
    for words in instructions:
        by_name.setdefault(words[0].upper(), []).append(words[1] if len(words) > 1 else "")
    assert by_name["USER"][-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(by_name["ENTRYPOINT"][-1])
    assert entrypoint == ["lrpilot", "serve", "--config", IMAGE_CONFIG_PATH]
    assert by_name["EXPOSE"] == [str(_default_config_port())]
    assert "healthcheck.py" in by_name["HEALTHCHECK"][-1] and "curl" not in by_name["HEALTHCHECK"][-1]
    assert any("/var/lib/lrpilot" in v for v in by_name["VOLUME"])
    assert not any("torch" in v or "[test" in v for v in by_name["RUN"])
