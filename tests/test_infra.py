"""The cluster manifests under infra/, checked without a cluster: that they parse, name the
right kinds, use the release image, point at files, commands and functions that exist, wire
the same service names, ports, buckets and secrets everywhere, and set only environment
variables that something actually reads. A manifest that drifts from the code fails here,
not at 3 a.m. on the cluster."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE = "ghcr.io/lorafleet/lorafleet:0.1.0"
MLFLOW_IMAGE_REPO = "ghcr.io/lorafleet/mlflow-server"
COMPOSE = "infra/compose/docker-compose.yaml"
# every YAML file under infra/, with the (apiVersion, kind, name) it must hold; a new file
# has to be added here, so none escapes these checks
K8S_FILES = {
    "infra/kuberay/raycluster.yaml": {("ray.io/v1", "RayCluster", "lorafleet")},
    "infra/kuberay/rayjob.yaml": {("ray.io/v1", "RayJob", None)},  # generateName: one per run
    "infra/kuberay/rayservice.yaml": {("ray.io/v1", "RayService", "lorafleet-serve")},
    "infra/mlflow/k8s.yaml": {
        ("v1", "Service", "postgres"),
        ("apps/v1", "StatefulSet", "postgres"),
        ("v1", "Service", "minio"),
        ("v1", "PersistentVolumeClaim", "minio-data"),
        ("apps/v1", "Deployment", "minio"),
        ("batch/v1", "Job", "minio-buckets"),
        ("v1", "Service", "mlflow"),
        ("apps/v1", "Deployment", "mlflow"),
    },
}
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


# ---- helpers -----------------------------------------------------------------------------


def docs(rel: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d is not None]


def all_k8s_docs() -> list[dict[str, Any]]:
    return [d for rel in K8S_FILES for d in docs(rel)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in all_k8s_docs() if d["kind"] == kind and d["metadata"].get("name", None) == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return docs(COMPOSE)[0]


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key`, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for group in ("containers", "initContainers") for cs in walk(doc, group) for c in cs]


def ray_node_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a Ray CR's head and worker groups (not the RayJob submitter)."""
    spec = (
        doc["spec"].get("rayClusterConfig")
        or doc["spec"].get("rayClusterSpec")
        or (doc["spec"] if doc["kind"] == "RayCluster" else None)
    )
    if spec is None:
        return []
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pins() -> dict[str, str]:
    """Exact versions pinned in pyproject.toml, by distribution name (extras dropped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {"lorafleet": project["version"]}
    for dep in project["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", dep)
        if m:
            out[m[1].lower()] = m[3]
    return out


def dockerfile(rel: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / rel).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` / `--name value` / `--flag` of a command line, as a dict."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            out[name] = value
        i += 1
    return out


def mlflow_server_flags() -> dict[str, dict[str, str]]:
    k8s = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    return {
        "k8s": flags(k8s.get("command", []) + k8s.get("args", [])),
        "compose": flags(compose()["services"]["mlflow"]["command"]),
    }


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse with lorafleet's real parser; a bad command fails the test instead of exiting."""
    from lorafleet.cli import build_parser

    parser = build_parser()
    assert argv and argv[0] in subcommands(parser), (
        f"'lorafleet {' '.join(argv)}': no subcommand {argv[:1]}; have {sorted(subcommands(parser))}"
    )
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"'lorafleet {' '.join(argv)}' is not a valid lorafleet command line")


# ---- parsing and kinds ---------------------------------------------------------------------


def test_every_yaml_parses_and_is_known():
    found = {p.relative_to(ROOT).as_posix() for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext)}
    assert found == set(K8S_FILES) | {COMPOSE}, "register new infra YAML files in K8S_FILES"
    for rel, expected in K8S_FILES.items():
        got = {(d["apiVersion"], d["kind"], d["metadata"].get("name")) for d in docs(rel)}
        assert got == expected, rel
        for d in docs(rel):
            assert set(d) <= {"apiVersion", "kind", "metadata", "spec"}, (rel, d["kind"], set(d))
            assert d["metadata"].get("name") or d["metadata"].get("generateName")
            assert "namespace" not in d["metadata"], "namespaces come from `kubectl -n`"


@pytest.mark.parametrize(
    "rel", sorted(K8S_FILES) + [COMPOSE, "infra/docker/Dockerfile", "infra/docker/mlflow.Dockerfile"]
)
def test_each_file_opens_with_the_command_that_applies_it(rel):
    lines = (ROOT / rel).read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{rel} must open with a comment"
    text = "\n".join(header)
    if rel.endswith(".yaml") and rel != COMPOSE:
        assert re.search(rf"kubectl -n lorafleet (apply|create) -f {re.escape(rel)}\b", text), text
    elif rel == COMPOSE:
        assert f"docker compose -f {rel} up" in text
    else:
        assert f"docker build -f {rel} -t " in text


def test_core_objects_and_pod_templates_match_the_kubernetes_schema():
    """Strict: an unknown or misplaced field (a typo kubectl would drop or refuse) fails."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    version = "1.29"  # the oldest Kubernetes infra/README.md supports
    for d in all_k8s_docs():
        if d["kind"] in RAY_KINDS:
            # the CRDs embed core pod templates: check those as PodTemplates
            for i, tpl in enumerate(walk(d, "template")):
                if isinstance(tpl, dict) and "spec" in tpl and "containers" in tpl["spec"]:
                    kv.validate(
                        {
                            "apiVersion": "v1",
                            "kind": "PodTemplate",
                            "metadata": {"name": f"t{i}"},
                            "template": tpl,
                        },
                        version,
                        strict=True,
                    )
        else:
            kv.validate(d, version, strict=True)


# ---- images and versions ------------------------------------------------------------------


def all_images() -> list[str]:
    images = [i for d in all_k8s_docs() for i in walk(d, "image")]
    images += [s["image"] for s in compose()["services"].values() if "image" in s]
    return images


def test_lorafleet_image_is_the_release_everywhere():
    assert f"ghcr.io/lorafleet/lorafleet:{pins()['lorafleet']}" == IMAGE  # tag = pyproject version
    images = all_images()
    lorafleet_images = [i for i in images if "lorafleet/lorafleet" in i]
    assert lorafleet_images and set(lorafleet_images) == {IMAGE}
    for rel in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayservice.yaml"):
        for tpl in ray_node_templates(docs(rel)[0]):
            assert [c["image"] for c in tpl["spec"]["containers"]] == [IMAGE], rel
    for image in images:  # reproducible pods: every image pinned, none floating
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_versions_match_pyproject():
    p = pins()
    assert one("RayCluster", "lorafleet")["spec"]["rayVersion"] == p["ray"]
    assert one("RayService", "lorafleet-serve")["spec"]["rayClusterConfig"]["rayVersion"] == p["ray"]
    base = [arg for ins, arg in dockerfile("infra/docker/Dockerfile") if ins == "FROM"]
    assert len(base) == 1 and base[0].startswith(f"rayproject/ray:{p['ray']}-py311-cu"), base
    # the MLflow server speaks the registry API of the clients' mlflow
    mlflow_images = {i for i in all_images() if i.startswith(MLFLOW_IMAGE_REPO + ":")}
    assert mlflow_images == {f"{MLFLOW_IMAGE_REPO}:{p['mlflow']}"}
    server = " ".join(arg for ins, arg in dockerfile("infra/docker/mlflow.Dockerfile") if ins == "RUN")
    assert f"mlflow=={p['mlflow']}" in server and "psycopg2" in server and "boto3" in server


def test_dockerfile_installs_the_project_and_its_pinned_deps():
    steps = dockerfile("infra/docker/Dockerfile")
    runs = [arg for ins, arg in steps if ins == "RUN"]
    copies = [arg for ins, arg in steps if ins == "COPY"]
    assert ("WORKDIR", "/app") in steps  # RayJob entrypoints name fleet files relative to it
    assert any(c.split()[-2:] == ["pyproject.toml", "./"] for c in copies)  # deps layer first
    assert any(c.split()[-2:] == [".", "."] for c in copies)  # then the repository
    assert any("['project']['dependencies']" in r and "pip install" in r for r in runs)
    assert any(re.search(r"pip install (--no-cache-dir )?-e \.(\s|$)", r) for r in runs)
    assert any("resolve_base('tiny-llama')" in r for r in runs)  # one base, identical on every pod
    # every `from lorafleet... import name` the build runs names a module and function that exist
    imports = [m for r in runs for m in re.findall(r"from (lorafleet[\w.]*) import (\w+)", r)]
    assert imports
    for module, name in imports:
        source = ROOT / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"Dockerfile imports {module}: no {source.relative_to(ROOT)}"
        tree = ast.parse(source.read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}, (
            f"Dockerfile imports {name} from {module}, which does not define it"
        )
    ignored = (ROOT / "infra/docker/Dockerfile.dockerignore").read_text().split()
    assert {".venv", "mlflow.db", "checkpoints", ".git"} <= set(ignored)


# ---- KubeRay -------------------------------------------------------------------------------


def test_raycluster_autoscales_gpu_workers_behind_a_cpu_head():
    spec = one("RayCluster", "lorafleet")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training task on the head
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0].get("resources"))
    gpu = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    ]
    assert len(gpu) == 1
    assert gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]  # scale to zero between fleets
    tolerations = gpu[0]["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_rayjob_entrypoint_is_a_real_command_on_a_real_fleet():
    from lorafleet.spec import load_fleet, resolve_jobs

    job = one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "lorafleet"
    args = parse_cli(argv[1:])
    assert args.command == "submit" and args.ray_address == "auto" and len(args.fleets) == 1
    fleet_file = ROOT / args.fleets[0]
    assert fleet_file.is_file(), f"{args.fleets[0]} is not in the repository (the image's /app)"
    fleet = load_fleet(fleet_file)  # the spec itself validates
    for j in resolve_jobs(fleet, fleet_file):
        assert Path(j.dataset).is_file(), j.dataset  # baked into the image with the fleet
    # submitted to the RayCluster of raycluster.yaml, which it must not delete
    cluster = one("RayCluster", "lorafleet")["metadata"]["name"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}
    assert not job["spec"].get("shutdownAfterJobFinishes")


def serve_app(config: dict[str, Any]) -> dict[str, Any]:
    apps = [a for a in config["applications"] if a["import_path"].startswith("lorafleet.")]
    assert len(apps) == 1
    return apps[0]


def test_rayservice_app_exists_in_code_and_matches_serve_apps():
    from lorafleet.serve.config import AppArgs

    service = one("RayService", "lorafleet-serve")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_app(config)
    module, _, func = app["import_path"].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    # a missing module fails (not skips): the RayService would crash-loop on deploy
    assert source.is_file(), f"{app['import_path']}: {source.relative_to(ROOT)} does not exist"
    defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert func in defined, f"{source.relative_to(ROOT)} defines no top-level function {func}()"
    cluster_app = serve_app(yaml.safe_load((ROOT / "serve_apps/cluster.yaml").read_text()))
    assert app["import_path"] == cluster_app["import_path"]
    args = AppArgs.model_validate(app["args"])  # unknown or mistyped args are refused here
    # it serves the base the RayJob's fleet trains on (else every adapter is refused, 409)
    from lorafleet.spec import load_fleet

    trained = parse_cli(shlex.split(one("RayJob")["spec"]["entrypoint"])[1:]).fleets[0]
    assert args.base_model == load_fleet(ROOT / trained).base_model
    assert config["http_options"]["port"] == 8000
    assert service["spec"]["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade"}
    # GPU room for the Serve replicas the app may ask for, warm ones included
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    limits = [
        (g, g["template"]["spec"]["containers"][0]["resources"].get("limits", {}))
        for g in cluster["workerGroupSpecs"]
    ]
    gpu_groups = [(g, float(lim["nvidia.com/gpu"])) for g, lim in limits if "nvidia.com/gpu" in lim]
    assert sum(g["maxReplicas"] * n for g, n in gpu_groups) >= args.max_replicas * args.replica_gpus
    assert sum(g["minReplicas"] * n for g, n in gpu_groups) >= args.min_replicas * args.replica_gpus
    head_ports = {
        p["containerPort"]: p.get("name")
        for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports.get(8000) == "serve"


# ---- wiring: env, endpoints, buckets, secrets ---------------------------------------------


def variables_read_by_something() -> set[str]:
    """Names lorafleet's settings, MLflow, boto (botocore) or huggingface_hub read."""
    pytest.importorskip("botocore", reason="pip install -e '.[dev]'")
    import botocore.configprovider
    import botocore.credentials
    import huggingface_hub.constants
    import huggingface_hub.utils._auth
    import mlflow.environment_variables as mlflow_env

    quoted = r"""['"]([A-Z][A-Z0-9_]+)['"]"""
    names = set(re.findall(quoted, (ROOT / "lorafleet/settings.py").read_text()))
    names |= {v.name for v in vars(mlflow_env).values() if isinstance(v, mlflow_env._EnvironmentVariable)}
    boto = inspect.getsource(botocore.configprovider) + inspect.getsource(botocore.credentials)
    names |= {n for n in re.findall(quoted, boto) if n.startswith("AWS_")}
    hub = inspect.getsource(huggingface_hub.constants) + inspect.getsource(huggingface_hub.utils._auth)
    names |= {n for n in re.findall(quoted, hub) if n.startswith("HF_")}
    return names


def ours(image: str) -> bool:
    return image == IMAGE or image.startswith(MLFLOW_IMAGE_REPO + ":")


def test_env_names_are_ones_something_reads():
    readers = variables_read_by_something()
    checked = 0
    for d in all_k8s_docs():
        for c in containers(d):
            if not ours(c["image"]):
                continue  # postgres and minio images document their own variables
            argv = " ".join(c.get("command", []) + c.get("args", []))
            expanded = set(re.findall(r"\$\(([A-Z0-9_]+)\)", argv))  # expanded by Kubernetes
            for name in env_map(c):
                checked += 1
                assert name in readers or name in expanded, f"{c['name']}: nothing reads {name}"
    for name, service in compose()["services"].items():
        if ours(service.get("image", "")):
            for var in service.get("environment", {}):
                checked += 1
                assert var in readers, f"compose {name}: nothing reads {var}"
    assert checked > 20


def test_every_ray_pod_reaches_the_shared_stores():
    want = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "LORAFLEET_STORAGE_PATH": "s3://lorafleet/checkpoints",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    secret = {"name": "lorafleet-s3"}
    n = 0
    for rel in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayservice.yaml"):
        for tpl in ray_node_templates(docs(rel)[0]):
            for c in tpl["spec"]["containers"]:
                env = env_map(c)
                assert {k: env.get(k) for k in want} == want, (rel, c["name"])
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert env[key]["secretKeyRef"] | secret == env[key]["secretKeyRef"], (rel, key)
                n += 1
    assert n == 5  # training head, cpu and gpu workers; serving head and gpu workers


def service_ports() -> dict[str, set[int]]:
    return {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
        for d in docs("infra/mlflow/k8s.yaml")
        if d["kind"] == "Service"
    }


def test_urls_point_at_services_that_exist():
    ports = service_ports()
    urls = [
        v
        for d in all_k8s_docs()
        for c in containers(d)
        for k, v in env_map(c).items()
        if k.endswith(("_URI", "_URL")) and isinstance(v, str)
    ]
    urls += [f for f in mlflow_server_flags()["k8s"].values() if "://" in f]
    checked = 0
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https") or parsed.scheme.startswith("postgresql"):
            host = parsed.hostname
            assert host in ports and parsed.port in ports[host], f"{url}: no Service {host}:{parsed.port}"
            checked += 1
    assert checked >= 5


def buckets_created(command: list[str]) -> set[str]:
    return set(re.findall(r'"([a-z0-9.-]{3,63})"', " ".join(command)))


def test_buckets_used_are_buckets_created():
    server = mlflow_server_flags()
    job = one("Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    for made, artefacts in (
        (buckets_created(job["command"]), server["k8s"]["--artifacts-destination"]),
        (
            buckets_created(compose()["services"]["minio-buckets"]["command"]),
            server["compose"]["--artifacts-destination"],
        ),
    ):
        assert urlparse(artefacts).netloc in made
        assert "lorafleet" in made  # LORAFLEET_STORAGE_PATH=s3://lorafleet/checkpoints
    for d in all_k8s_docs():
        for c in containers(d):
            path = env_map(c).get("LORAFLEET_STORAGE_PATH")
            if path:
                assert urlparse(path).netloc == "lorafleet"


def readme_commands() -> list[str]:
    """Shell lines of infra/README.md's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (INFRA / "README.md").read_text(), re.S)
    return [ln.strip() for b in blocks for ln in re.sub(r"\\\n\s*", " ", b).splitlines() if ln.strip()]


def test_every_secret_used_is_created_in_the_readme():
    created: set[tuple[str, str]] = set()
    for line in readme_commands():
        m = re.search(r"create secret generic (\S+)", line)
        if m:
            created |= {(m[1], key) for key in re.findall(r"--from-literal=([A-Za-z0-9_]+)=", line)}
    used = {(r["name"], r["key"]) for d in all_k8s_docs() for r in walk(d, "secretKeyRef")}
    assert used and used <= created, f"not created in infra/README.md: {sorted(used - created)}"


# ---- MLflow server: k8s and compose --------------------------------------------------------


def test_compose_runs_the_same_three_services():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    k8s = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["image"] == k8s["image"]
    assert {"postgres", "minio-buckets"} <= set(mlflow["depends_on"])
    assert urlparse(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    server = mlflow_server_flags()
    for where in ("k8s", "compose"):
        f = server[where]
        assert {
            "--backend-store-uri",
            "--artifacts-destination",
            "--serve-artifacts",
            "--allowed-hosts",
        } <= set(f)
        assert f["--backend-store-uri"].startswith("postgresql+psycopg2://mlflow:")
        assert urlparse(f["--backend-store-uri"]).hostname == "postgres"
        assert f["--artifacts-destination"].startswith("s3://")
    assert server["k8s"]["--artifacts-destination"] == server["compose"]["--artifacts-destination"]


def test_mlflow_server_accepts_the_host_names_clients_use():
    """MLflow >= 3.5 answers 403 to Host headers outside --allowed-hosts (default: localhost
    and private IPs), which would lock every Ray pod calling http://mlflow:5000 out."""
    from mlflow.server.security_utils import is_allowed_host_header

    server = mlflow_server_flags()
    k8s_hosts = server["k8s"]["--allowed-hosts"].split(",")
    tracking = {
        env_map(c)["MLFLOW_TRACKING_URI"]
        for d in all_k8s_docs()
        for c in containers(d)
        if "MLFLOW_TRACKING_URI" in env_map(c)
    }
    extra = {"localhost:5000", "mlflow.lorafleet.svc.cluster.local:5000"}  # port-forward, FQDN
    for host in {urlparse(u).netloc for u in tracking} | extra:
        assert is_allowed_host_header(k8s_hosts, host), host
    compose_hosts = server["compose"]["--allowed-hosts"].split(",")
    assert is_allowed_host_header(compose_hosts, "localhost:5000")
    assert is_allowed_host_header(compose_hosts, "mlflow:5000")
    for hosts in (k8s_hosts, compose_hosts):  # the guard is still on
        assert not is_allowed_host_header(hosts, "attacker.example:5000")


# ---- the README walkthrough ----------------------------------------------------------------


def test_readme_walks_from_empty_cluster_to_served_fleet():
    text = (INFRA / "README.md").read_text()
    commands = "\n".join(readme_commands())
    for step in (
        "helm install kuberay-operator kuberay/kuberay-operator",
        "docker build -f infra/docker/Dockerfile -t " + IMAGE,
        "docker push " + IMAGE,
        "docker build -f infra/docker/mlflow.Dockerfile",
        "lorafleet adapters promote",
        "/v1/chat/completions",
    ):
        assert step in commands, step
    assert "from openai import OpenAI" in text
    referenced = set(re.findall(r"-f (infra/\S+)", commands))
    assert referenced >= set(K8S_FILES) | {COMPOSE}, set(K8S_FILES) - referenced
    assert all((ROOT / r).is_file() for r in referenced), referenced
    assert "## Cost of a 1,000-customer fleet" in text and "H100-hours per retraining" in text


def test_readme_lorafleet_commands_parse():
    """Every `lorafleet ...` the page tells people to run, also through `kubectl exec ... --`."""
    separators = {"&", "&&", "|", ";", "--"}
    n = 0
    for line in readme_commands():
        if not re.search(r"(^|(--|&&|;|\|)\s+)lorafleet\s", line):
            continue  # not a lorafleet command (and maybe half of a multi-line JSON body)
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            if token == "lorafleet" and (i == 0 or tokens[i - 1] in separators):
                end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in separators), len(tokens))
                parse_cli(tokens[i + 1 : end])
                n += 1
    assert n >= 8
