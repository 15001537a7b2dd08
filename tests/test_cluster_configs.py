"""Offline checks of the Ray cluster definitions in cluster/ (no network, no credentials, no cluster).

AWS and GCP launcher configs go through Ray's own `prepare_config` + `validate_config` (the JSON schema
in ray/autoscaler/ray-schema.json; on AWS also the resource autofill `ray up` does, fed a fake EC2
answer), then through what the schema leaves out: instance types and their GPU counts, IAM profile /
service accounts, a head that runs no tasks, enough training GPUs for jobs/cc3m-1.3b.yaml, setup
commands installing pyproject.toml's pins, the image's Ray version, and where Ray's autoscaler (v2, the
`ray up` default) would start nodes for each stage's work. The KubeRay RayCluster and RayJob get the
same treatment through KubeRay's CR-to-autoscaler translation. Every check is a small helper that
raises AssertionError; the negative tests feed it mutated copies to show it can fail.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import socket
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.aws import node_provider as aws_node_provider
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.core.generated.autoscaler_pb2 import GangResourceRequest, ResourceRequest, ResourceRequestByCount

from pipeline.config.recipe import load_recipe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which pyproject allows
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RECIPE = ROOT / "jobs" / "cc3m-1.3b.yaml"


class Machine(NamedTuple):
    vcpus: int
    gpus: int
    memory_gib: int
    gpu_name: str | None = None


# The instance types we use, from the providers' specs. On GCP, a2/g2 machine types come with their
# GPUs; guestAccelerators would add more.
AWS_TYPES = {
    "m6i.4xlarge": Machine(16, 0, 64),
    "m6i.8xlarge": Machine(32, 0, 128),
    "g5.12xlarge": Machine(48, 4, 192, "A10G"),
    "p4d.24xlarge": Machine(96, 8, 1152, "A100"),
}
GCP_TYPES = {
    "n2-standard-16": Machine(16, 0, 64),
    "n2-standard-32": Machine(32, 0, 128),
    "g2-standard-48": Machine(48, 4, 192, "L4"),
    "a2-highgpu-8g": Machine(96, 8, 680, "A100"),
}
PROVIDERS = {
    "aws": {"path": CLUSTER / "aws.yaml", "types": AWS_TYPES, "type_key": "InstanceType", "fs": "s3fs"},
    "gcp": {"path": CLUSTER / "gcp.yaml", "types": GCP_TYPES, "type_key": "machineType", "fs": "gcsfs"},
}
# prepare_config fills each of these that a config leaves out from the provider's defaults.yaml.
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
GCP_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{1,63}$")
PIP_OPTIONS_WITH_VALUE = {"-r", "-c", "-e", "-i", "-f", "-t", "--index-url", "--extra-index-url", "--find-links"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
SHELL_REDIRECTS = {">", ">>", "<", "2>"}


# -- loading ---------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(raw: dict) -> dict:
    """The config merged with Ray's defaults, checked against Ray's schema."""
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def ec2_catalog(region: str, credentials=None) -> list[dict]:
    """AWS_TYPES as EC2's DescribeInstanceTypes would describe them."""
    catalog = []
    for name, machine in AWS_TYPES.items():
        entry = {"InstanceType": name, "VCpuInfo": {"DefaultVCpus": machine.vcpus}}
        entry["MemoryInfo"] = {"SizeInMiB": machine.memory_gib * 1024}
        if machine.gpus:
            entry["GpuInfo"] = {"Gpus": [{"Name": machine.gpu_name, "Manufacturer": "NVIDIA", "Count": machine.gpus}]}
        catalog.append(entry)
    return catalog


def launcher_config(raw: dict) -> dict:
    """The config `ray up` hands to the autoscaler. On AWS it also asks EC2 about every instance type
    and merges what it learns (memory, accelerator_type:*) under our `resources`; the EC2 answer comes
    from AWS_TYPES here."""
    cfg = prepare_config(copy.deepcopy(raw))
    if cfg["provider"]["type"] == "aws":
        with mock.patch.object(aws_node_provider, "list_ec2_instances", ec2_catalog):
            cfg = aws_node_provider.AWSNodeProvider.fillout_available_node_types_resources(cfg)
    validate_config(cfg)
    return cfg


def pyproject_dependencies() -> list[Requirement]:
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        deps = tomllib.loads(text)["project"]["dependencies"]
    else:  # the [project] table's `dependencies = [...]`, one quoted requirement per item
        project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
        deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", project, re.M | re.S).group(1))
    return [Requirement(dep) for dep in deps]


def rayjob_overrides(rayjob: dict) -> tuple[Path, list[str]]:
    """The recipe and key=value overrides the RayJob's entrypoint runs `dalle run` with."""
    words = shlex.split(rayjob["spec"]["entrypoint"])
    if words[:3] == ["python", "-m", "pipeline.cli"]:
        words = ["dalle", *words[3:]]
    assert words[:2] == ["dalle", "run"], f"entrypoint does not run the dalle CLI: {rayjob['spec']['entrypoint']}"
    recipe = ROOT / words[2]
    assert recipe.parent == ROOT / "jobs" and recipe.is_file(), f"entrypoint recipe {words[2]} is not in jobs/"
    return recipe, [w for w in words[3:] if not w.startswith("-")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here must work without network access or cloud credentials."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster config check tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_yaml(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def recipe(rayjob):
    """cc3m-1.3b as the clusters run it: with the RayJob's overrides, if any (cluster/README.md uses the same)."""
    path, overrides = rayjob_overrides(rayjob)
    assert path == RECIPE
    return load_recipe(path, overrides=overrides)


# -- checks shared by the positive and negative tests ---------------------------------------------


def check_no_inherited_commands(raw: dict) -> None:
    for key in COMMAND_KEYS:
        assert key in raw, f"{key} missing: prepare_config would take it from Ray's defaults.yaml"


def node_gpus(provider: str, node_config: dict) -> int:
    spec = PROVIDERS[provider]
    itype = node_config.get(spec["type_key"])
    assert itype in spec["types"], f"unknown instance type {itype!r}: add it to the table with its vCPUs and GPUs"
    gpus = spec["types"][itype].gpus
    if provider == "gcp":
        gpus += sum(int(acc["acceleratorCount"]) for acc in node_config.get("guestAccelerators", []))
    return gpus


def check_node_types(cfg: dict, provider: str) -> None:
    spec = PROVIDERS[provider]
    for name, node_type in cfg["available_node_types"].items():
        node_config, resources = node_type["node_config"], node_type.get("resources")
        assert resources, f"{name}: no explicit resources (Ray would ask the cloud API for them)"
        gpus = node_gpus(provider, node_config)
        vcpus = spec["types"][node_config[spec["type_key"]]].vcpus
        assert resources.get("GPU", 0) == gpus, f"{name}: resources say {resources.get('GPU', 0)} GPUs, has {gpus}"
        assert 0 <= resources.get("CPU", -1) <= vcpus, f"{name}: CPU {resources.get('CPU')} outside [0, {vcpus}]"
        is_head = name == cfg["head_node_type"]
        if provider == "aws":
            assert node_config.get("IamInstanceProfile"), f"{name}: no IamInstanceProfile (bucket access)"
            # Without ImageId Ray falls back to an Ubuntu 18.04 Deep Learning AMI with an old driver.
            assert node_config.get("ImageId"), f"{name}: no ImageId"
        else:
            assert GCP_LABEL_VALUE.match(name), f"{name}: not a valid GCP label value"
            boot = [d for d in node_config.get("disks", []) if d.get("boot")]
            assert boot and boot[0]["initializeParams"].get("sourceImage"), f"{name}: no boot disk image"
            if not is_head:  # Ray gives the head its own autoscaler service account
                accounts = node_config.get("serviceAccounts") or []
                assert accounts and accounts[0].get("email"), f"{name}: no serviceAccounts (bucket access)"
            if gpus:
                waits = " ".join(node_type.get("initialization_commands", []))
                assert "nvidia-smi" in waits, f"{name}: Docker must start after the NVIDIA driver is up"
                scheduling = node_config.get("scheduling")
                assert isinstance(scheduling, dict), f"{name}: scheduling must be a mapping (the API takes an object)"
                assert scheduling.get("onHostMaintenance") == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"


def check_token_auth(cfg: dict) -> None:
    """Every node starts Ray with token auth, and has the token `ray up`'s machine holds."""
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token is not synced to the nodes"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start.split("ray start")[0], f"{key}: ray start without RAY_AUTH_MODE=token"


def check_head(cfg: dict) -> None:
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no task lands on it"
    assert head["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert head.get("max_workers", 0) == 0, "the head type must not be used for workers"


def training_fit(resources: dict, recipe) -> int:
    """Transformer workers (cpus_per_worker CPUs + 1 GPU each) one node of this type holds."""
    cpus = recipe.transformer.train.cpus_per_worker
    return int(min(resources.get("GPU", 0), resources.get("CPU", 0) // cpus))


def check_training_capacity(node_types: dict, recipe) -> str:
    """Returns the one node type training runs on; it must hold all of the recipe's workers."""
    hosts = {name: training_fit(t["resources"], recipe) for name, t in node_types.items()}
    hosts = {name: fit for name, fit in hosts.items() if fit and node_types[name].get("max_workers", 0)}
    assert len(hosts) == 1, f"transformer workers fit on {sorted(hosts)}: training could mix GPU models"
    (host, fit), workers = next(iter(hosts.items())), recipe.transformer.train.workers
    total = fit * node_types[host]["max_workers"]
    assert total >= workers, f"{host}: at most {total} transformer workers, the recipe has {workers}"
    return host


def launches(autoscaling_cfg: dict, requests=(), gang=()) -> tuple[dict[str, int], int]:
    """Nodes Ray's autoscaler v2 would launch on an empty cluster for these demands, and how many
    demands it finds infeasible. `requests` are (bundle, count); `gang` are placement groups."""
    config = AutoscalingConfig(copy.deepcopy(autoscaling_cfg), skip_content_hash=True)
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=config.get_node_type_configs(),
        max_num_nodes=config.get_max_num_worker_nodes(),
        resource_requests=[
            ResourceRequestByCount(request=ResourceRequest(resources_bundle=bundle), count=count)
            for bundle, count in requests
        ],
        gang_resource_requests=[
            GangResourceRequest(requests=[ResourceRequest(resources_bundle=b) for b in bundles]) for bundles in gang
        ],
    )
    reply = ResourceDemandScheduler().schedule(request)
    infeasible = len(reply.infeasible_resource_requests) + len(reply.infeasible_gang_resource_requests)
    return {launch.instance_type: launch.count for launch in reply.to_launch}, infeasible


def check_routing(autoscaling_cfg: dict, recipe, separate_encode_group: bool) -> None:
    """Each stage's demand starts the node type meant for it, and nothing else."""
    types = autoscaling_cfg["available_node_types"]
    host = check_training_capacity(types, recipe)
    train = recipe.transformer.train
    # Ray Train reserves its workers as one placement group.
    placement_group = [{"CPU": train.cpus_per_worker, "GPU": 1}] * train.workers
    nodes, infeasible = launches(autoscaling_cfg, gang=[placement_group])
    needed = math.ceil(train.workers / training_fit(types[host]["resources"], recipe))
    assert (nodes, infeasible) == ({host: needed}, 0), f"training launches {nodes} ({infeasible} infeasible)"

    cpu_task = {"CPU": recipe.ray.cpus_per_task}
    nodes, infeasible = launches(autoscaling_cfg, requests=[(cpu_task, 256)])
    assert nodes and not infeasible, "CPU tasks start no node"
    assert all(not types[name]["resources"].get("GPU") for name in nodes), f"CPU tasks launch GPU nodes: {nodes}"

    encode = recipe.encode
    assert encode.actors and encode.gpus_per_actor, "size the encode pool: the cluster starts without GPUs"
    actor = {"CPU": recipe.ray.cpus_per_task, "GPU": encode.gpus_per_actor}
    nodes, infeasible = launches(autoscaling_cfg, requests=[(actor, encode.actors)])
    assert nodes and not infeasible, f"encode actors: {infeasible} infeasible"
    if separate_encode_group:
        assert host not in nodes, f"encode actors launch the training group: {nodes}"


def pip_requirements(commands: list[str]) -> dict[str, Requirement]:
    """The requirements that `pip install` commands install, by canonical name."""
    found = {}
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words[:-1]):
            if Path(word).name not in ("pip", "pip3") or words[i + 1] != "install":
                continue
            skip = False
            for arg in words[i + 2 :]:
                if arg in SHELL_OPERATORS:
                    break
                if arg in SHELL_REDIRECTS:  # e.g. an unquoted numpy>=2.0: `>` redirects to a file "=2.0"
                    skip = True
                    continue
                if skip or arg.startswith("-"):
                    skip = arg in PIP_OPTIONS_WITH_VALUE
                    continue
                req = Requirement(arg)
                found[canonicalize_name(req.name)] = req
    return found


def check_pins(commands: list[str], extra: tuple[str, ...] = ()) -> None:
    """Every pyproject dependency (plus `extra`) is installed, with pyproject's pin or an exact
    version inside it; extras at least pyproject's."""
    installed = pip_requirements(commands)
    for dep in pyproject_dependencies():
        got = installed.get(canonicalize_name(dep.name))
        assert got is not None, f"{dep.name} is not installed"
        assert dep.extras <= got.extras, f"{dep.name}: extras {sorted(got.extras)}, pyproject has {sorted(dep.extras)}"
        exact = [s.version for s in got.specifier if s.operator == "=="]
        same = got.specifier == dep.specifier
        assert same or (exact and dep.specifier.contains(exact[0])), f"{dep.name}: {got.specifier} vs {dep.specifier}"
    for name in extra:
        assert canonicalize_name(name) in installed, f"{name} is not installed"


def ray_version_of(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-[\w.-]+)?", image)
    assert match, f"{image}: not a rayproject/ray release image"
    return match.group(1)


def check_ray_version(images: list[str]) -> None:
    ray_pin = next(d for d in pyproject_dependencies() if d.name == "ray")
    assert ray_pin.specifier.contains(ray.__version__), f"installed Ray {ray.__version__} is outside pyproject's pin"
    for image in images:
        version = ray_version_of(image)
        assert version == ray.__version__, f"{image} has Ray {version}, installed is {ray.__version__}"


# -- KubeRay checks


def containers(spec: dict) -> list[tuple[str, dict]]:
    """(group name, Ray container) of the head and every worker group."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]["containers"][0]) for name, group in groups]


def autoscaling_config_of(raycluster: dict) -> dict:
    """The autoscaler config KubeRay's autoscaler builds from the CR (it runs validate_config)."""
    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


def check_raycluster(doc: dict, recipe) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster"), "not a ray.io/v1 RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__, f"rayVersion {spec['rayVersion']} != Ray {ray.__version__}"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", "the Jobs API must listen beyond localhost"
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must run no tasks"
    ports = {p["containerPort"] for p in containers(spec)[0][1].get("ports", [])}
    assert {6379, 8265} <= ports, f"head ports {sorted(ports)} lack GCS 6379 or the dashboard 8265"
    check_ray_version([container["image"] for _, container in containers(spec)])
    uses_generated_start = any("KUBERAY_GEN_RAY_START_CMD" in " ".join(c.get("args", [])) for _, c in containers(spec))
    overwrite = doc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true"
    assert uses_generated_start == overwrite, "args run $KUBERAY_GEN_RAY_START_CMD only with the overwrite annotation"
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
            f"{name}: replicas out of range"
        )
    gpu_groups = 0
    for name, container in containers(spec):
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert "cpu" in requests and "memory" in requests, f"{name}: no CPU/memory requests"
        assert "cpu" in limits and "memory" in limits, f"{name}: no CPU/memory limits"
        if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
            assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu"), f"{name}: GPU request != limit"
            gpu_groups += 1
        secrets = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets, (
            f"{name}: storage credentials not from a Secret"
        )
        assert "RAY_AUTH_TOKEN" in secrets, f"{name}: no cluster token from a Secret"
        mode = {e["name"]: e.get("value") for e in container.get("env", [])}.get("RAY_AUTH_MODE")
        assert mode == "token", f"{name}: RAY_AUTH_MODE is {mode!r}, not token"
        if uses_generated_start:
            check_pins(container["args"], extra=("s3fs", "gcsfs"))
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"
    autoscaling = autoscaling_config_of(doc)
    check_head(autoscaling)
    check_routing(autoscaling, recipe, separate_encode_group=False)


def check_rayjob(doc: dict, raycluster: dict) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob"), "not a ray.io/v1 RayJob"
    spec = doc["spec"]
    rayjob_overrides(doc)
    assert spec.get("shutdownAfterJobFinishes") is True, "the job's cluster must go away when it finishes"
    assert spec.get("ttlSecondsAfterFinished", 0) > 0, "keep the finished cluster a little while for its logs"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env.get("working_dir"), "the runtime env must ship the pipeline's source (working_dir)"
    assert spec["rayClusterSpec"] == raycluster["spec"], "rayClusterSpec differs from raycluster.yaml's spec"
    annotations = doc["metadata"].get("annotations", {})
    assert annotations == raycluster["metadata"].get("annotations", {}), "annotations differ from the RayCluster's"


# -- AWS and GCP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_launcher_config_passes_ray_validation_and_ours(provider, recipe):
    raw = load_yaml(PROVIDERS[provider]["path"])
    cfg = launcher_config(raw)
    assert cfg["provider"]["type"] == provider
    check_no_inherited_commands(raw)
    # merge_setup_commands prepends the shared setup to the head's and workers' own lists.
    assert cfg["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    check_node_types(cfg, provider)
    check_head(cfg)
    check_token_auth(cfg)
    # Only on GCP does the autoscaler prefer gpu_encode for 1-GPU actors (see the next test).
    check_routing(cfg, recipe, separate_encode_group=provider == "gcp")
    check_pins(raw["setup_commands"], extra=(PROVIDERS[provider]["fs"],))
    check_ray_version([cfg["docker"]["image"]])
    assert cfg["docker"].get("container_name"), "docker needs a container name"
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in cfg["available_node_types"].values())


def test_ray_up_on_aws_adds_memory_that_pulls_encode_onto_gpu_train(aws, recipe):
    cfg = launcher_config(aws)
    encode = cfg["available_node_types"]["gpu_encode"]["resources"]
    # Our CPU and GPU counts win; EC2's memory and accelerator type are added.
    assert encode["CPU"] == 7 and encode["GPU"] == 4 and encode["accelerator_type:A10G"] == 1 and encode["memory"] > 0
    # No task asks for memory, so every worker type scores 0 on it and Ray's scorer falls back to
    # its average, where the 8-GPU node wins; gpu_encode takes 1-GPU actors once gpu_train is full.
    actor = {"CPU": recipe.ray.cpus_per_task, "GPU": recipe.encode.gpus_per_actor}
    assert launches(cfg, requests=[(actor, 32)]) == ({"gpu_train": 4}, 0)
    assert launches(cfg, requests=[(actor, 96)]) == ({"gpu_train": 8, "gpu_encode": 8}, 0)
    assert launches(prepared(aws), requests=[(actor, 32)]) == ({"gpu_encode": 8}, 0)  # without EC2's answer


def test_checks_run_offline():
    with pytest.raises(AssertionError, match="tried to use the network"):
        socket.create_connection(("pypi.org", 443), timeout=1)


def test_pyproject_fallback_parser_matches_tomllib(monkeypatch):
    if tomllib is None:
        pytest.skip("no tomllib to compare with")
    expected = pyproject_dependencies()
    monkeypatch.setitem(globals(), "tomllib", None)
    assert pyproject_dependencies() == expected


def test_gcp_project_is_set():
    assert isinstance(load_yaml(PROVIDERS["gcp"]["path"])["provider"]["project_id"], str)


# -- KubeRay ---------------------------------------------------------------------------------------


def test_raycluster(raycluster, recipe):
    check_raycluster(raycluster, recipe)


def test_rayjob(rayjob, raycluster):
    check_rayjob(rayjob, raycluster)


# -- each check can fail ---------------------------------------------------------------------------


@pytest.fixture
def aws() -> dict:
    return load_yaml(PROVIDERS["aws"]["path"])


@pytest.fixture
def gcp() -> dict:
    return load_yaml(PROVIDERS["gcp"]["path"])


def test_schema_rejects_a_node_type_without_resources(aws):
    del aws["available_node_types"]["gpu_train"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        prepared(aws)


def test_schema_rejects_a_misspelt_top_level_key(aws):
    aws["idle_timeout_minute"] = aws.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        prepared(aws)


def test_bad_instance_type_passes_the_schema_but_not_our_check(aws):
    aws["available_node_types"]["gpu_train"]["node_config"]["InstanceType"] = "p4d.24xlarg"
    cfg = prepared(aws)  # node_config is free-form to Ray's schema
    with pytest.raises(AssertionError, match="unknown instance type 'p4d.24xlarg'"):
        check_node_types(cfg, "aws")


def set_resources(gpus: int):
    return lambda node_type: node_type["resources"].update(GPU=gpus)


def set_node_config(**fields):
    return lambda node_type: node_type["node_config"].update(fields)


@pytest.mark.parametrize(
    ("provider", "node_type", "mutate", "message"),
    [
        ("aws", "gpu_encode", set_resources(8), "resources say 8 GPUs, has 4"),
        ("aws", "cpu_workers", lambda t: t["node_config"].pop("IamInstanceProfile"), "no IamInstanceProfile"),
        ("aws", "head", lambda t: t["node_config"].pop("ImageId"), "no ImageId"),
        # The list form is what Ray's own GCP examples long used.
        ("gcp", "gpu_train", set_node_config(scheduling=[{"onHostMaintenance": "TERMINATE"}]), "a mapping"),
        ("gcp", "gpu_train", set_node_config(scheduling={}), "cannot live-migrate"),
        ("gcp", "gpu_encode", set_node_config(serviceAccounts=[]), "no serviceAccounts"),
        ("gcp", "gpu_train", lambda t: t.pop("initialization_commands"), "after the NVIDIA driver"),
        (
            "gcp",
            "gpu_encode",
            set_node_config(guestAccelerators=[{"acceleratorType": "nvidia-l4", "acceleratorCount": 4}]),
            "resources say 4 GPUs, has 8",
        ),
    ],
)
def test_node_type_check_fails(provider, node_type, mutate, message, request):
    raw = request.getfixturevalue(provider)
    mutate(raw["available_node_types"][node_type])
    with pytest.raises(AssertionError, match=message):
        check_node_types(prepared(raw), provider)


def test_gcp_node_type_names_must_be_label_values(gcp):
    gcp["available_node_types"]["cpu.workers"] = gcp["available_node_types"].pop("cpu_workers")
    with pytest.raises(AssertionError, match="not a valid GCP label value"):
        check_node_types(prepared(gcp), "gcp")


def test_head_check_fails_when_the_head_takes_tasks(aws):
    aws["available_node_types"]["head"]["resources"] = {"CPU": 16}
    with pytest.raises(AssertionError, match="CPU 0"):
        check_head(prepared(aws))


def test_token_check_fails_without_the_auth_mode_or_the_token(aws):
    cfg = prepared(aws)
    cfg["worker_start_ray_commands"] = [
        c.replace("export RAY_AUTH_MODE=token; ", "") for c in aws["worker_start_ray_commands"]
    ]
    with pytest.raises(AssertionError, match="worker_start_ray_commands: ray start without RAY_AUTH_MODE=token"):
        check_token_auth(cfg)
    cfg = prepared(aws)
    cfg["file_mounts"] = {}
    with pytest.raises(AssertionError, match="not synced"):
        check_token_auth(cfg)


def test_capacity_check_fails_with_too_few_training_nodes(gcp, recipe):
    gcp["available_node_types"]["gpu_train"]["max_workers"] = 7
    with pytest.raises(AssertionError, match="at most 56 transformer workers, the recipe has 64"):
        check_training_capacity(prepared(gcp)["available_node_types"], recipe)


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_routing_check_fails_when_the_encode_group_advertises_all_its_cpus(provider, recipe, request):
    raw = request.getfixturevalue(provider)
    raw["available_node_types"]["gpu_encode"]["resources"]["CPU"] = 48
    with pytest.raises(AssertionError, match="training could mix GPU models"):
        check_routing(launcher_config(raw), recipe, separate_encode_group=False)


def test_routing_check_fails_when_encode_actors_start_training_nodes(gcp, recipe):
    # What `ray up` does to the AWS config: every worker type also advertises its memory.
    for name in ("gpu_encode", "gpu_train"):
        machine = GCP_TYPES[gcp["available_node_types"][name]["node_config"]["machineType"]]
        gcp["available_node_types"][name]["resources"]["memory"] = machine.memory_gib * 2**30
    with pytest.raises(AssertionError, match="encode actors launch the training group"):
        check_routing(launcher_config(gcp), recipe, separate_encode_group=True)


def test_routing_check_fails_without_a_sized_encode_pool(gcp, rayjob):
    path, overrides = rayjob_overrides(rayjob)
    plain = load_recipe(path, overrides=[*overrides, "encode.actors=null", "encode.gpus_per_actor=null"])
    with pytest.raises(AssertionError, match="size the encode pool"):
        check_routing(launcher_config(gcp), plain, separate_encode_group=True)


def test_omitted_command_list_is_filled_from_rays_defaults(gcp):
    del gcp["head_setup_commands"]
    # The shallow merge in prepare_config brings in defaults.yaml's 2018 client pin.
    assert "pip install google-api-python-client==1.7.8" in prepared(gcp)["head_setup_commands"]
    with pytest.raises(AssertionError, match="head_setup_commands missing"):
        check_no_inherited_commands(gcp)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"deepspeed>=0.19.8,<0.20"', "", "deepspeed is not installed"),
        ('"img2dataset==1.47.0"', '"img2dataset==1.46.0"', "img2dataset: ==1.46.0 vs ==1.47.0"),
        ('"ray[default,data,train]==2.60.0"', '"ray[default]==2.60.0"', "ray: extras"),
        ('"numpy>=2.0"', "numpy>=2.0", "numpy: "),  # unquoted: the shell reads > as a redirection
        ('"s3fs>=2024.1"', "", "s3fs is not installed"),
    ],
)
def test_pin_check_fails(aws, old, new, message):
    commands = [c.replace(old, new) for c in aws["setup_commands"]]
    assert commands != aws["setup_commands"]
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_pins(commands, extra=("s3fs",))


def test_ray_version_check_fails_on_another_image(aws):
    with pytest.raises(AssertionError, match="has Ray 2.59.0"):
        check_ray_version([aws["docker"]["image"].replace(ray.__version__, "2.59.0")])
    with pytest.raises(AssertionError, match="not a rayproject/ray release image"):
        check_ray_version(["rayproject/ray:latest-gpu"])


def kuberay_gpu_group(doc: dict) -> dict:
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: kuberay_gpu_group(d).update(replicas=9), "gpu: replicas out of range"),
        (lambda d: kuberay_gpu_group(d).update(maxReplicas=7), "at most 56 transformer workers"),
        (lambda d: d["metadata"].pop("annotations"), "overwrite annotation"),
        (lambda d: d["spec"].update(rayVersion="2.59.0"), "rayVersion 2.59.0"),
        (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("dashboard-host"), "Jobs API"),
        (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].pop(0), "RAY_AUTH_MODE"),
        (
            lambda d: [
                r.pop("nvidia.com/gpu")
                for r in kuberay_gpu_group(d)["template"]["spec"]["containers"][0]["resources"].values()
            ],
            "no worker group has an nvidia.com/gpu limit",
        ),
    ],
)
def test_raycluster_check_fails(raycluster, recipe, mutate, message):
    doc = copy.deepcopy(raycluster)
    mutate(doc)
    with pytest.raises(AssertionError, match=message):
        check_raycluster(doc, recipe)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["spec"].update(entrypoint="dalle run jobs/missing.yaml"), "not in jobs/"),
        (lambda d: d["spec"].update(entrypoint="python train.py"), "does not run the dalle CLI"),
        (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "go away"),
        (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {}"), "working_dir"),
        (lambda d: d["metadata"].update(annotations={}), "annotations differ"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas=4), "differs"),
    ],
)
def test_rayjob_check_fails(rayjob, raycluster, mutate, message):
    doc = copy.deepcopy(rayjob)
    mutate(doc)
    with pytest.raises(AssertionError, match=message):
        check_rayjob(doc, raycluster)
