"""Every file in cluster/ is a config Ray (or KubeRay) accepts, every key carries a comment, the header
gives the commands, every node installs the package, and the training arguments in them are valid.

    .venv/bin/python -m pytest -q tests/cluster/test_cluster_configs.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from cluster_helpers import REPO
from ray.autoscaler._private.util import prepare_config, validate_config

from layerpar.cluster_check import PLACEHOLDERS, WORD, check_cluster_yaml, scalars
from layerpar.config import load_config
from layerpar.train.loop import parse_args  # what launch/train.py parses its arguments with

pytestmark = pytest.mark.cluster

CLUSTER_DIR = REPO / "cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER_DIR.glob("*.yaml") if not p.name.startswith("kuberay"))
KUBERAY = CLUSTER_DIR / "kuberay-rayjob.yaml"
RAYSERVICE = CLUSTER_DIR / "kuberay-rayservice.yaml"
ALL_YAMLS = [*LAUNCHER_YAMLS, KUBERAY, RAYSERVICE]
TRAINING_YAMLS = [*LAUNCHER_YAMLS, KUBERAY]
ids = [p.name for p in ALL_YAMLS]
launcher_ids = [p.name for p in LAUNCHER_YAMLS]

KEY = re.compile(r"^(\s*)(?:-\s+)?(\"[^\"]+\"|[A-Za-z0-9_.~/-]+):(\s|$)")
BLOCK_SCALAR = re.compile(r":\s*[>|][-+]?\s*(#.*)?$|^\s*-\s+[>|][-+]?\s*$")


def header(path: Path) -> str:
    """The leading comment block, '# ' stripped."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(out)


def header_commands(path: Path) -> list[str]:
    """Commands in the header: a line starting with `ray ` or `kubectl `, joined with the more deeply
    indented lines that continue it."""
    cmds: list[str] = []
    indent = None
    for line in header(path).splitlines():
        stripped = line.strip()
        lead = len(line) - len(line.lstrip())
        if stripped.startswith(("ray ", "kubectl ")):
            cmds.append(stripped.split("  #")[0].strip())
            indent = lead
        elif cmds and indent is not None and stripped and lead > indent + 1 and not stripped.startswith("("):
            cmds[-1] += " " + stripped.split("  #")[0].strip()
        else:
            indent = None
    return cmds


def uncommented_keys(text: str) -> list[str]:
    """Keys with neither an inline comment nor a comment line right above them (block scalar
    contents, e.g. shell commands, are not keys)."""
    bad, prev, block_indent = [], "", None
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if indent > block_indent:
                continue
            block_indent = None
        m = KEY.match(line)
        if m and not line.lstrip().startswith("#"):
            has_inline = re.search(r"\s#\s", line) is not None
            if not has_inline and not prev.lstrip().startswith("#"):
                bad.append(line.strip())
        if BLOCK_SCALAR.search(line):
            block_indent = indent
        prev = line
    return bad


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=launcher_ids)
def test_launcher_yaml_passes_ray_schema(path):
    """What `ray up` does before it touches any node: fill in the provider's defaults, then check
    against Ray's cluster-config JSON schema (ray/autoscaler/ray-schema.json)."""
    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))


def test_local_yaml_is_a_one_machine_cluster():
    cfg = prepare_config(yaml.safe_load((CLUSTER_DIR / "local.yaml").read_text()))
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert cfg["max_workers"] == 0
    env_lines = " ".join(cfg["setup_commands"])
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in env_lines and "RAY_AUTH_MODE=token" in env_lines


@pytest.mark.parametrize("path", ALL_YAMLS, ids=ids)
def test_every_key_is_commented(path):
    assert uncommented_keys(path.read_text()) == []


def test_the_comment_checker_catches_a_bare_key():
    text = "# a\nx: 1\ny: 2  # b\nz: |\n  k: v\nw:\n  - u: 1\n"
    assert uncommented_keys(text) == ["z: |", "w:", "- u: 1"]


@pytest.mark.parametrize("path", ALL_YAMLS, ids=ids)
def test_no_credentials_and_capital_placeholders(path):
    text = path.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"BEGIN [A-Z ]*PRIVATE KEY", r"aws_secret_access_key",
                    r"(?i)password\s*:", r"ghp_[A-Za-z0-9]{20,}", r"\b[0-9a-f]{64}\b"):
        assert not re.search(pattern, text), f"{path.name} looks like it holds a credential: {pattern}"
    # placeholders are CAPITALS, never <angle brackets> or lower-case stand-ins
    assert not re.search(r"<[a-z][^>]*>|\byour[-_]|changeme|xxx", text, re.I)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=launcher_ids)
def test_header_gives_the_four_commands(path):
    rel = f"cluster/{path.name}"
    cmds = header_commands(path)
    for verb in ("ray up", "ray submit", "ray down"):
        assert any(c.startswith(verb) and rel in c for c in cmds), f"{path.name}: no `{verb} {rel}`"
    assert any(c.startswith("ray job submit") and "--working-dir ." in c for c in cmds)


def test_kuberay_header_gives_the_commands():
    cmds = header_commands(KUBERAY)
    assert any(c.startswith("kubectl apply -f cluster/kuberay-rayjob.yaml") for c in cmds)
    assert any(c.startswith("kubectl delete -f cluster/kuberay-rayjob.yaml") for c in cmds)
    assert any(c.startswith("ray job submit") for c in cmds)


def _train_args(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if "--" in words and words[0] == "ray" and words[1] == "submit":
        return words[words.index("--") + 1:]
    return words[words.index("launch/train.py") + 1:]


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=[p.name for p in TRAINING_YAMLS])
def test_training_commands_are_valid(path):
    """The train.py arguments in each header (and the RayJob entrypoint) parse, and their config
    loads: a stale flag or config key in the docs fails here, not on a cluster."""
    cmds = [c for c in header_commands(path) if "train.py" in c]
    if path == KUBERAY:
        cmds.append(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
    assert cmds
    for cmd in cmds:
        args = parse_args(_train_args(cmd))
        load_config(args.config, args.overrides)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=launcher_ids)
def test_every_node_gets_the_package(path):
    """`ray submit` copies only the script: the package source is mounted on every node and
    setup_commands installs it."""
    cfg = yaml.safe_load(path.read_text())
    mounts = cfg["file_mounts"]
    for local in ("./layerpar", "./launch", "./pyproject.toml", "./README.md"):
        assert local in mounts.values(), f"{path.name} does not mount {local}"
        remote = next(r for r, loc in mounts.items() if loc == local)
        assert remote.startswith("~/layerpar-src/")  # never ~/layerpar: see local.yaml
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    setup = " ".join(cfg["setup_commands"])
    for node_setup in ("head_setup_commands", "worker_setup_commands"):  # what each kind of node runs
        assert "pip install -q -e ~/layerpar-src" in setup + " ".join(cfg[node_setup])
    assert "~/.layerpar_env" in setup and "RAY_AUTH_MODE=token" in setup
    assert ".gitignore" in cfg["rsync_filter"]  # never .venv/ or runs/


def test_cloud_heads_install_the_cpu_torch_first():
    """The head runs no branch worker: CPU torch before layerpar, so pip skips the CUDA build."""
    for name in ("aws.yaml", "gcp.yaml"):
        head = yaml.safe_load((CLUSTER_DIR / name).read_text())["head_setup_commands"]
        cpu = next(i for i, c in enumerate(head) if "download.pytorch.org/whl/cpu" in c)
        pkg = next(i for i, c in enumerate(head) if "-e ~/layerpar-src" in c)
        assert cpu < pkg, name


def test_gpu_workers_have_one_gpu_each():
    aws = yaml.safe_load((CLUSTER_DIR / "aws.yaml").read_text())["available_node_types"]
    assert aws["ray.worker.gpu"]["resources"]["GPU"] == 1
    assert aws["ray.head.default"]["resources"].get("GPU", 0) == 0
    gcp = yaml.safe_load((CLUSTER_DIR / "gcp.yaml").read_text())["available_node_types"]
    assert gcp["ray_worker_gpu"]["resources"]["GPU"] == 1
    (acc,) = gcp["ray_worker_gpu"]["node_config"]["guestAccelerators"]
    assert acc["acceleratorCount"] == 1


def test_kuberay_rayjob_structure():
    doc = yaml.safe_load(KUBERAY.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python launch/train.py ")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"working_dir", "pip", "config"}
    assert runtime_env["config"]["setup_timeout_seconds"] > 600  # a torch install outlasts Ray's default
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 10001}
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the entrypoint asks for as many one-GPU workers as the group starts
    overrides = dict(a.split("=", 1) for a in shlex.split(spec["entrypoint"]) if "=" in a)
    assert int(overrides["parallel.workers"]) == group["replicas"]
    assert overrides["parallel.placement"] == "STRICT_SPREAD"


# RayServiceSpec's fields in KubeRay v1.5 (ray-operator/apis/ray/v1/rayservice_types.go): a misspelt
# key would be dropped silently by the API server's pruning, so the manifest may use these only.
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                   "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds", "suspend", "managedBy"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "authOptions",
                   "headGroupSpec", "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
                   "gcsFaultToleranceOptions", "upgradeStrategy"}


def test_kuberay_rayservice_header_gives_the_commands():
    cmds = header_commands(RAYSERVICE)
    assert any(c.startswith("kubectl apply -f cluster/kuberay-rayservice.yaml") for c in cmds)
    assert any(c.startswith("kubectl delete -f cluster/kuberay-rayservice.yaml") for c in cmds)
    assert any(c.startswith("kubectl create secret generic layerpar-serve-token") for c in cmds)


def test_kuberay_rayservice_structure():
    """The RayService's keys are the CRD's; its serveConfigV2 passes Ray Serve's own schema (what
    KubeRay posts to Serve's REST API) and builds layerpar's application; one replica's group fits
    the GPU pods, and the autoscaler may start as many pods as serve.ray_max_replicas groups need."""
    from ray.serve.schema import ServeDeploySchema

    from layerpar.serve.ray_serve import REPLICA_CPUS, build_app, deployment_options, replica_config

    text = RAYSERVICE.read_text()
    for word, value in FILLED.items():  # Serve's schema wants a real URI where the placeholder is
        text = re.sub(rf"\b{word}\b", value, text)
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, set(spec) - RAYSERVICE_SPEC
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    serve_raw = yaml.safe_load(spec["serveConfigV2"])
    serve_cfg = ServeDeploySchema.model_validate(serve_raw)
    assert serve_cfg.http_options.port == 8000 and not serve_raw.get("grpc_options")
    (app,) = serve_cfg.applications
    assert app.import_path == "layerpar.serve.ray_serve:app" and app.route_prefix == "/"
    assert set(app.runtime_env) == {"working_dir", "pip", "config"}
    assert app.runtime_env["config"]["setup_timeout_seconds"] > 600
    build_app(dict(app.args))  # the args resolve to a layerpar config and a deployment
    from layerpar.serve.launcher import resolve

    ns = type("Args", (), {"checkpoint": None, "config": app.args["config"], "set": app.args["set"],
                           "host": None, "port": None, "metrics_port": None, "http_port": None})
    cfg = replica_config(resolve(ns)[0])
    options = deployment_options(cfg)
    bundles = options["placement_group_bundles"]
    assert bundles[0] == {"CPU": REPLICA_CPUS} and len(bundles) == cfg.parallel.workers + 1
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["serve"] == 8000 and ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert all(b.get("GPU", 0) <= gpus for b in bundles[1:]) and cfg.parallel.gpus_per_worker == 1
    w, s = cfg.parallel.workers, cfg.serve
    assert group["minReplicas"] >= s.ray_min_replicas * w and group["maxReplicas"] >= s.ray_max_replicas * w
    for container in (head_container, worker):  # the token from a Secret, never a value in the file
        (env,) = [e for e in container["env"] if e["name"] == "LAYERPAR_SERVE_TOKEN"]
        assert set(env) == {"name", "valueFrom"}


def test_versions_match_the_pinned_ray():
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"ray\[([a-z,]+)\]==([0-9.]+)"', pyproject)
    assert len(pins) == 1 and pins[0][1] == ray.__version__, pins
    assert "default" in pins[0][0].split(",")  # `ray job submit` needs ray[default]


# --- placeholders: refused before `ray up` (Ray's schema accepts them) ---

FILLED = {"AWS_REGION": "us-west-2", "AWS_AVAILABILITY_ZONES": "us-west-2a,us-west-2b",
          "AMI_ID": "ami-0123456789abcdef0", "GCP_REGION": "us-central1", "GCP_ZONE": "us-central1-a",
          "GCP_PROJECT_ID": "my-project-123", "DLVM_IMAGE_FAMILY": "common-cu128", "NAMESPACE": "ml",
          "REPO_ARCHIVE_URL": "https://example.org/layerpar-0123abc.zip"}
SHIPPED_PLACEHOLDERS = {"aws.yaml": {"provider.region": "AWS_REGION", "provider.availability_zone":
                                     "AWS_AVAILABILITY_ZONES",
                                     "available_node_types.ray.head.default.node_config.ImageId": "AMI_ID"},
                        "gcp.yaml": {"provider.project_id": "GCP_PROJECT_ID",
                                     "provider.region": "GCP_REGION"},
                        "kuberay-rayservice.yaml": {
                            "metadata.namespace": "NAMESPACE",
                            "spec.serveConfigV2.applications[0].runtime_env.working_dir": "REPO_ARCHIVE_URL"},
                        "kuberay-rayjob.yaml": {"metadata.namespace": "NAMESPACE",
                                                "spec.runtimeEnvYAML.working_dir": "REPO_ARCHIVE_URL"}}


@pytest.mark.parametrize("name", sorted(SHIPPED_PLACEHOLDERS))
def test_unfilled_placeholders_are_refused_naming_the_key(name):
    problem = check_cluster_yaml(CLUSTER_DIR / name)
    assert problem is not None, f"{name} with its placeholders passed the check"
    assert len(problem.splitlines()) == 1
    for key, word in SHIPPED_PLACEHOLDERS[name].items():
        assert f"{key} ({word})" in problem, problem


def _filled_copy(name: str, tmp_path: Path) -> Path:
    text = (CLUSTER_DIR / name).read_text()
    for word, value in FILLED.items():
        text = re.sub(rf"\b{word}\b", value, text)
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("name", sorted(SHIPPED_PLACEHOLDERS))
def test_a_filled_copy_passes_the_check(name, tmp_path):
    assert check_cluster_yaml(_filled_copy(name, tmp_path)) is None


def test_a_filled_copy_with_a_schema_error_is_refused(tmp_path):
    path = _filled_copy("aws.yaml", tmp_path)
    path.write_text(path.read_text().replace("max_workers: 4\n", "max_workers: four\n", 1))
    problem = check_cluster_yaml(path)
    assert problem and "schema rejects it" in problem


def test_local_yaml_passes_and_the_cli_exits_2_on_placeholders():
    ok = subprocess.run([sys.executable, "-m", "layerpar.cluster_utils", "check", "cluster/local.yaml"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ": ok" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "layerpar.cluster_utils", "check", "cluster/aws.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "provider.region (AWS_REGION)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


# CAPITALISED words that are real values, not placeholders.
REAL_VALUES = {"TERMINATE", "PERSISTENT", "STRICT_SPREAD", "CPU", "GPU", "README", "LAYERPAR_SERVE_TOKEN"}


@pytest.mark.parametrize("path", ALL_YAMLS, ids=ids)
def test_the_checker_knows_every_placeholder(path):
    """Every CAPITALISED word in a value (shell commands aside) is a placeholder the check refuses,
    or a known real value: a new placeholder cannot slip past the check."""
    words = {w for key, text in scalars(yaml.safe_load(path.read_text()))
             if "_commands[" not in key for w in WORD.findall(text) if len(w) >= 3}
    assert words <= PLACEHOLDERS | REAL_VALUES, words - PLACEHOLDERS - REAL_VALUES


# --- ray start / ray stop in the YAMLs ---

def _ray_commands(cfg: dict, verb: str) -> list[list[str]]:
    """The arguments of every `ray VERB ...` in the start commands (split at `;` and `&&`)."""
    found = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg[key]:
            for part in re.split(r";|&&", cmd):
                words = shlex.split(part.strip())
                if words[:2] == ["ray", verb]:
                    found.append(words[2:])
    return found


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=launcher_ids)
def test_ray_start_commands_parse_and_name_their_ports(path):
    """Ray's own CLI parser accepts every `ray start` (a misspelt flag fails here); the ports that
    collide with another Ray on the machine are written out, so a user can move them."""
    from ray.scripts.scripts import start

    cfg = yaml.safe_load(path.read_text())
    starts = _ray_commands(cfg, "start")
    assert len(starts) == 2
    for args in starts:
        start.make_context("start", list(args))
        assert any(a.startswith("--dashboard-agent-listen-port=") for a in args), args
    (head,) = [a for a in starts if "--head" in a]
    for flag in ("--port=", "--dashboard-port=", "--ray-client-server-port=", "--dashboard-host=127.0.0.1"):
        assert any(a.startswith(flag) for a in head), f"{path.name}: the head sets no {flag}"


def test_local_yaml_never_runs_a_bare_ray_stop():
    """One machine: stop this cluster's node by its temp dir, and make `ray down`'s `ray stop` (run in
    a login shell that sources ~/.layerpar_env) do the same."""
    cfg = yaml.safe_load((CLUSTER_DIR / "local.yaml").read_text())
    assert _ray_commands(cfg, "stop") == []
    temp_dirs = {a.split("=", 1)[1] for args in _ray_commands(cfg, "start") for a in args
                 if a.startswith("--temp-dir=")}
    assert len(temp_dirs) == 1
    (temp_dir,) = temp_dirs
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg[key][0] == f"python -m layerpar.cluster_utils stop-ray {temp_dir}"
    setup = "\n".join(cfg["setup_commands"])
    assert f"LAYERPAR_RAY_TEMP_DIR={temp_dir}" in setup
    assert "ray() { if [" in setup and 'stop-ray "$LAYERPAR_RAY_TEMP_DIR"' in setup


def test_cloud_fixes():
    gcp = yaml.safe_load((CLUSTER_DIR / "gcp.yaml").read_text())
    # Compute Engine wants an object; a list is rejected
    assert gcp["available_node_types"]["ray_worker_gpu"]["node_config"]["scheduling"] == \
        {"onHostMaintenance": "TERMINATE"}
    aws = yaml.safe_load((CLUSTER_DIR / "aws.yaml").read_text())
    assert aws["provider"]["cache_stopped_nodes"] is False  # stopped nodes' volumes keep billing
