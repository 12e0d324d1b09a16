"""The cluster side: KubeRay manifests, the Ray cluster-launcher config, ray_job.yaml.

Each file parses; the fields the pipelines rely on are there and agree with each other
(Ray version, GPU requests vs. autoscaling groups, dependencies vs. pyproject.toml, S3
credentials from a secret and never inline); and every `python -m pipelines.X` command
written in a manifest or a README names a pipeline module, flags and a config that exist.

Plain YAML and text only: no Ray instance, no Kubernetes, no cloud. The launcher config is
validated against the JSON schema shipped inside the installed Ray package (read as a
file, without importing ray).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
RAY_JOB = ROOT / "ray_job.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
OPERATOR_VALUES = KUBERAY / "kuberay-operator-values.yaml"
NIGHTLY_CONFIG = KUBERAY / "nightly.yaml"  # the chain's config, read from S3 by the scheduled jobs

PIPELINE_MODULES = {"synth", "prepare", "train", "embed", "search", "evaluate", "nightly", "demo"}
CONFIG_NAMES = {"tiny", "inshop", "consumer2shop"}
# The flags of each pipeline (DESIGN.md's command table) that the docs may use.
PIPELINE_FLAGS = {
    "synth": {"--out", "--seed"},
    "prepare": {"--root", "--manifest", "--out"},
    "train": {"--config", "--set"},
    "embed": {"--model", "--catalog", "--out", "--incremental"},
    "search": {"--features", "--out"},
    "evaluate": {"--rankings", "--out"},
    "nightly": set(),
    "demo": {"--workdir"},
}
EXPECTED_API = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "ServiceAccount": "v1",
}
S3_SECRET = "mga-s3"
CREDENTIAL_NAME = re.compile(r"SECRET|ACCESS_KEY|SESSION_TOKEN|PASSWORD|TOKEN", re.IGNORECASE)
MGA_IMAGE = re.compile(r"^[\w.\-:/]+/mga-ray:[\w.\-]+$")


# ----------------------------------------------------------------------------- helpers


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    return [Requirement(text) for text in _pyproject()["project"]["dependencies"]]


def _cluster_ray_version() -> str:
    """The Ray every cluster runs: the version of the Dockerfile's base image."""
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([\d.]+)-", DOCKERFILE.read_text(), re.MULTILINE)
    assert base, "cluster/Dockerfile does not start from a rayproject/ray:X.Y.Z image"
    return base.group(1)


RAY_VERSION = _cluster_ray_version()


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml")) + [RAY_JOB]


def _docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under cluster/kuberay/ (Helm values and the nightly config excluded)."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path in (OPERATOR_VALUES, NIGHTLY_CONFIG):
            continue
        found.extend((path, doc) for doc in _docs(path))
    return found


def _by_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in _manifests() if doc.get("kind") == kind]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _pod_specs(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def _quantity(value: Any) -> float:
    """Kubernetes CPU / count quantities: 4, "4", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gpus(container: dict[str, Any]) -> int:
    return int(_quantity(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's, each RayJob's and each RayCronJob's."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in _by_kind("RayCluster")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for p, d in _by_kind("RayJob")]
    specs += [
        (f"{p.name}:{d['metadata']['name']}", d["spec"]["jobTemplate"]["rayClusterSpec"]) for p, d in _by_kind("RayCronJob")
    ]
    return specs


def _gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        group
        for group in spec.get("workerGroupSpecs", [])
        if any(_gpus(c) for c in group["template"]["spec"]["containers"])
    ]


# --------------------------------------------------------------- commands in the docs


def _command_texts() -> list[tuple[str, str]]:
    """(where, text) of everything a user may copy a command from.

    YAML string values carry whole commands (folded scalars are joined by the parser);
    raw files (READMEs, YAML comments, the Dockerfile) are scanned with shell line
    continuations joined.
    """
    texts = []
    for path in _yaml_files():
        rel = str(path.relative_to(ROOT))
        texts.extend((rel, text) for doc in _docs(path) for text in _strings(doc))
    for path in _yaml_files() + sorted(CLUSTER.rglob("*.md")) + [DOCKERFILE]:
        raw = re.sub(r"\\\n[#\s]*", " ", path.read_text())
        texts.append((str(path.relative_to(ROOT)), raw))
    return texts


def _pipeline_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv after the module) for every `python -m pipelines.X ...`."""
    commands = []
    for where, text in _command_texts():
        for line in text.splitlines():
            for match in re.finditer(r"python3? -m pipelines\.(\w+)([^`|;&)]*)", line):
                rest = match.group(2)
                try:
                    argv = shlex.split(rest, comments=True)
                except ValueError:
                    argv = rest.split()
                commands.append((where, match.group(1), argv))
    return commands


def _options(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--flag value` / `--flag=value` / bare `--flag` pairs, in order."""
    pairs: list[tuple[str, str | None]] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            if eq:
                pairs.append((flag, value))
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                pairs.append((flag, argv[index + 1]))
                index += 1
            else:
                pairs.append((flag, None))
        index += 1
    return pairs


def _config_name(path: str) -> str | None:
    match = re.search(r"(?:^|/)pipelines/configs/(\w+)\.yaml$", path)
    return match.group(1) if match else None


def _config_fields() -> dict[str, dict[str, str]] | None:
    """Class -> {field: annotation} of the training config models, read from source."""
    sources = [ROOT / "pipelines" / "config.py", ROOT / "mga" / "config.py"]
    if not all(path.exists() for path in sources):
        return None
    classes: dict[str, dict[str, str]] = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                fields = classes.setdefault(node.name, {})
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        fields[item.target.id] = ast.unparse(item.annotation)
    return classes if "TrainConfig" in classes else None


def _resolved_train_config(argv: list[str]) -> dict[str, Any] | None:
    """The YAML tree of a train command's --config with its --set overrides applied."""
    options = _options(argv)
    configs = [value for flag, value in options if flag == "--config" and value]
    if not configs or _config_name(configs[0]) is None:
        return None
    path = ROOT / "pipelines" / "configs" / f"{_config_name(configs[0])}.yaml"
    if not path.exists():
        return None
    tree = yaml.safe_load(path.read_text()) or {}
    for flag, value in options:
        if flag == "--set" and value and "=" in value:
            key, _, raw = value.partition("=")
            node = tree
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = yaml.safe_load(raw)
    return tree


# ------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses_to_mappings(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


def test_manifests_have_the_expected_kinds_and_api_versions():
    kinds = set()
    for path, doc in _manifests():
        kind = doc.get("kind")
        assert kind in EXPECTED_API, f"{path.name}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == EXPECTED_API[kind], f"{path.name}: {kind} needs apiVersion {EXPECTED_API[kind]}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {kind} without metadata.name"
        kinds.add(kind)
    assert kinds == set(EXPECTED_API), f"missing manifests for {set(EXPECTED_API) - kinds}"


def test_ray_versions_agree_everywhere():
    ray = next(requirement for requirement in _requirements() if requirement.name == "ray")
    assert ray.specifier.contains(RAY_VERSION), f"the clusters' Ray {RAY_VERSION} is outside pyproject's {ray}"
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']} != the Dockerfile's {RAY_VERSION}"
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and base.group(1).startswith(f"rayproject/ray:{RAY_VERSION}-"), "Dockerfile base image is not pinned to the Ray version"
    assert "FROM ${BASE_IMAGE}" in dockerfile
    launcher = _docs(LAUNCHER)[0]
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")


def test_every_container_image_is_pinned_ray_or_the_mga_image():
    for path, doc in _manifests():
        for key_path, image in _images(doc):
            assert image.startswith(f"rayproject/ray:{RAY_VERSION}-") or MGA_IMAGE.match(image), (
                f"{path.name} {key_path}: image {image!r} is neither rayproject/ray:{RAY_VERSION}-* nor the mga-ray image"
            )


def _images(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield where, value
            else:
                yield from _images(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _images(value, f"{where}[{index}]")


def test_ray_cluster_specs_autoscale_a_gpu_group_from_zero_under_a_cpu_head():
    specs = _cluster_specs()
    assert len(specs) >= 3, "expected the RayCluster, the RayJob's and the RayCronJob's cluster specs"
    for where, spec in specs:
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
        head = spec["headGroupSpec"]
        assert not any(_gpus(c) for c in head["template"]["spec"]["containers"]), f"{where}: the head must be CPU-only"
        groups = spec["workerGroupSpecs"]
        names = [group["groupName"] for group in groups]
        assert len(names) == len(set(names)), f"{where}: duplicate groupName"
        for group in [head, *groups]:
            params = group.get("rayStartParams", {})
            assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
        gpu_groups = _gpu_groups(spec)
        assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
        for group in gpu_groups:
            label = f"{where} group {group['groupName']}"
            assert group["minReplicas"] == 0, f"{label}: minReplicas must be 0 (scale GPUs to zero)"
            assert group["maxReplicas"] >= 1
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            for container in group["template"]["spec"]["containers"]:
                resources = container["resources"]
                gpus = _gpus(container)
                assert gpus >= 1
                if "requests" in resources and "nvidia.com/gpu" in resources["requests"]:
                    assert _quantity(resources["requests"]["nvidia.com/gpu"]) == gpus, f"{label}: GPU request != limit"
                if "num-gpus" in group.get("rayStartParams", {}):
                    assert int(group["rayStartParams"]["num-gpus"]) == gpus, f"{label}: num-gpus != nvidia.com/gpu limit"


def test_every_ray_pod_gets_s3_settings_from_the_secret_and_the_service_account():
    accounts = {doc["metadata"]["name"] for _, doc in _by_kind("ServiceAccount")}
    pods = [(where, name, pod) for where, spec in _cluster_specs() for name, pod in _pod_specs(spec)]
    for where, name, pod in pods:
        assert pod.get("serviceAccountName") in accounts, f"{where} {name}: service account not defined in cluster/kuberay"
        for container in pod["containers"]:
            refs = [ref.get("secretRef", {}) for ref in container.get("envFrom", [])]
            assert any(ref.get("name") == S3_SECRET and ref.get("optional") is True for ref in refs), (
                f"{where} {name}: container {container['name']} does not load the optional secret {S3_SECRET}"
            )


def test_no_credentials_are_written_into_any_file():
    for path, doc in _manifests():
        for where, env in _env_lists(doc):
            for var in env:
                if CREDENTIAL_NAME.search(var["name"]):
                    assert "value" not in var, f"{path.name} {where}: {var['name']} has a literal value"
    for path in _yaml_files() + [DOCKERFILE]:
        text = path.read_text()
        assert not re.search(r"\bA(KIA|SIA)[0-9A-Z]{16}\b", text), f"{path}: looks like an AWS access key id"
    env_vars = _docs(RAY_JOB)[0].get("env_vars", {})
    assert not [name for name in env_vars if CREDENTIAL_NAME.search(name)], "ray_job.yaml must not carry credentials"


def _env_lists(node: Any, where: str = "") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield where, value
            else:
                yield from _env_lists(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _env_lists(value, f"{where}[{index}]")


def _check_rayjob_spec(where: str, spec: dict[str, Any]) -> None:
    assert isinstance(spec.get("entrypoint"), str) and "python -m pipelines." in spec["entrypoint"], f"{where}: entrypoint"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML is not a YAML mapping"
    env_vars = runtime_env.get("env_vars", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), f"{where}: env_vars must be strings"
    assert env_vars.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1", f"{where}: needs RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (init_ray's runtime env)"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the job's cluster must go away after the job"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter.get("restartPolicy") == "Never"
    assert submitter["containers"] and submitter["containers"][0].get("image")
    assert "headGroupSpec" in spec["rayClusterSpec"]


def test_rayjob_trains():
    jobs = _by_kind("RayJob")
    assert jobs
    for path, doc in jobs:
        _check_rayjob_spec(f"{path.name}:{doc['metadata']['name']}", doc["spec"])
    assert any("python -m pipelines.train" in doc["spec"]["entrypoint"] for _, doc in jobs)


def _assert_cron(schedule: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields), f"bad cron schedule {schedule!r}"


def test_raycronjob_runs_the_nightly_chain_and_states_its_requirements():
    jobs = _by_kind("RayCronJob")
    assert jobs
    for path, doc in jobs:
        _assert_cron(doc["spec"]["schedule"])
        template = doc["spec"]["jobTemplate"]
        _check_rayjob_spec(f"{path.name}:{doc['metadata']['name']}", template)
        assert re.fullmatch(r"python -m pipelines\.nightly s3://\S+\.yaml", template["entrypoint"]), template["entrypoint"]
        text = path.read_text()
        assert "KubeRay >= 1.6.0" in text and "feature gate" in text and "RayCronJob" in text
        assert "cronjob-nightly.yaml" in text, "the RayCronJob must point to the plain CronJob alternative"


def test_operator_values_enable_the_raycronjob_feature_gate():
    gates = {gate["name"]: gate["enabled"] for gate in _docs(OPERATOR_VALUES)[0]["featureGates"]}
    assert gates.get("RayCronJob") is True


def test_the_example_nightly_config_plans_every_step():
    from pipelines.nightly import load_nightly_config, plan_steps

    steps = plan_steps(load_nightly_config(str(NIGHTLY_CONFIG)))
    assert [step.name for step in steps] == ["prepare", "embed", "search", "evaluate"]
    assert all(step.args.incremental for step in steps[:3])
    assert "aws s3 cp cluster/kuberay/nightly.yaml" in NIGHTLY_CONFIG.read_text()


def test_plain_cronjob_submits_the_nightly_chain_to_the_long_lived_cluster():
    jobs = _by_kind("CronJob")
    assert jobs
    cluster_names = {doc["metadata"]["name"] for _, doc in _by_kind("RayCluster")}
    for path, doc in jobs:
        spec = doc["spec"]
        _assert_cron(spec["schedule"])
        assert spec.get("concurrencyPolicy") == "Forbid", f"{path.name}: runs must not overlap"
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        container = pod["containers"][0]
        command = " ".join(container.get("command", []) + container.get("args", []))
        for needle in ("ray job submit", "--address", "--runtime-env ray_job.yaml", 'python -m pipelines.nightly "$MGA_NIGHTLY"'):
            assert needle in command, f"{path.name}: command lacks {needle!r}"
        env = {var["name"]: var.get("value", "") for var in container.get("env", [])}
        address = env.get("RAY_ADDRESS", "")
        assert any(address.startswith(f"http://{name}-head-svc") and address.endswith(":8265") for name in cluster_names), (
            f"{path.name}: RAY_ADDRESS {address!r} is not the dashboard of a RayCluster defined here"
        )
        # ray_job.yaml is found relative to workingDir, where the image puts the repo.
        workdir = container.get("workingDir")
        assert workdir and f"WORKDIR {workdir}" in DOCKERFILE.read_text()
        assert "COPY --chown=ray:users ray_job.yaml ./" in DOCKERFILE.read_text()


def _launcher_schema() -> dict[str, Any] | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_launcher_config_matches_rays_schema_and_autoscales_gpu_workers():
    config = _docs(LAUNCHER)[0]
    schema = _launcher_schema()
    jsonschema = pytest.importorskip("jsonschema")
    if schema is None:
        pytest.skip("ray is not installed: no launcher schema to validate against")
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert all("InstanceType" in t["node_config"] for t in types.values())
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for node_type in gpu_types:
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
        assert re.match(r"^(g|p)\d", node_type["node_config"]["InstanceType"]), "GPU type on a non-GPU instance family"
    assert types[config["head_node_type"]].get("resources", {}).get("GPU", 0) == 0, "the head should be CPU-only"


def _runtime_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies minus ray (the cluster image provides it)."""
    return [requirement for requirement in _requirements() if requirement.name != "ray"]


def test_dependencies_follow_pyproject():
    pip = _docs(RAY_JOB)[0]["pip"]
    packages = [Requirement(text) for text in (pip["packages"] if isinstance(pip, dict) else pip)]
    assert {str(p) for p in packages} == {str(r) for r in _runtime_requirements()}, "ray_job.yaml pip != pyproject.toml deps (minus ray)"
    assert not any(p.name == "ray" for p in packages), "never reinstall ray inside a runtime env"
    words = shlex.split(" ".join(_docs(LAUNCHER)[0]["setup_commands"]))
    installed = {str(Requirement(word)) for word in words[words.index("install") + 1:] if not word.startswith("-")}
    # The launcher's nodes are Linux x86-64 GPU machines: what the markers choose there.
    node = {"sys_platform": "linux", "platform_machine": "x86_64"}
    chosen = {str(Requirement(f"{r.name}{r.specifier}")) for r in _runtime_requirements() if r.marker is None or r.marker.evaluate(node)}
    assert installed == chosen, "launcher setup_commands != pyproject.toml deps for Linux x86-64 (minus ray)"
    assert "pyproject.toml" in DOCKERFILE.read_text(), "the Dockerfile should install pyproject.toml's dependencies"


def test_ray_job_runtime_env():
    env = _docs(RAY_JOB)[0]
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    for pattern in (".git", ".venv"):
        assert pattern in excludes, f"ray_job.yaml excludes lack {pattern}"
    assert any("__pycache__" in p for p in excludes) and any("mga_demo" in p for p in excludes)
    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "env_vars values must be strings"
    assert env_vars.get("RAY_TRAIN_V2_ENABLED") == "1"
    assert env_vars.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1", "init_ray's runtime env conflicts without it"
    assert "OMP_NUM_THREADS" in env_vars


def test_docs_show_pipeline_commands():
    commands = _pipeline_commands()
    modules = {module for _, module, _ in commands}
    assert {"train", "embed"} <= modules
    assert any(module == "embed" and "--incremental" in argv for _, module, argv in commands)


def _module_flags(module: str) -> set[str]:
    """The flags pipelines/<module>.py (or the package pipelines/<module>/) declares with
    add_argument("--..."); DESIGN.md's flags while the module does not exist yet, or when it
    builds flag names at run time."""
    path = ROOT / "pipelines" / f"{module}.py"
    sources = [path] if path.exists() else sorted((ROOT / "pipelines" / module).glob("*.py"))
    if not sources:
        return PIPELINE_FLAGS[module]
    flags: set[str] = set()
    dynamic = False
    for node in (node for source in sources for node in ast.walk(ast.parse(source.read_text()))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
            else:
                dynamic = True
    return flags | PIPELINE_FLAGS[module] if dynamic or not flags else flags


def test_commands_name_known_modules_flags_and_configs():
    fields = _config_fields()
    for where, module, argv in _pipeline_commands():
        assert module in PIPELINE_MODULES, f"{where}: unknown pipeline module pipelines.{module}"
        known = _module_flags(module)
        for flag, value in _options(argv):
            assert flag in known, f"{where}: pipelines.{module} has no flag {flag}"
            if flag == "--config":
                assert value and _config_name(value) in CONFIG_NAMES, (
                    f"{where}: --config {value!r} is not pipelines/configs/{{tiny,inshop,consumer2shop}}.yaml"
                )
            if flag == "--set" and fields is not None:
                assert value and "=" in value, f"{where}: --set {value!r} is not key=value"
                _assert_config_key(where, value.partition("=")[0], fields)


def _assert_config_key(where: str, dotted: str, fields: dict[str, dict[str, str]]) -> None:
    current = "TrainConfig"
    for part in dotted.split("."):
        assert current in fields and part in fields[current], f"{where}: --set {dotted}: no field {part!r} in {current}"
        current = fields[current][part]


def _referenced(pattern: str) -> list[str]:
    found = set()
    for _, text in _command_texts():
        found.update(re.findall(pattern, text))
    return sorted(found)


@pytest.mark.parametrize("module", _referenced(r"python3? -m pipelines\.(\w+)"))
def test_referenced_pipeline_module_exists(module):
    assert module in PIPELINE_MODULES
    path, package_main = ROOT / "pipelines" / f"{module}.py", ROOT / "pipelines" / module / "__main__.py"
    assert path.exists() or package_main.exists(), f"neither pipelines/{module}.py nor pipelines/{module}/__main__.py exists"
    runs = package_main.exists() or re.search(r"""if __name__ == ["']__main__["']""", path.read_text())
    assert runs, f"`python -m pipelines.{module}` would do nothing"


@pytest.mark.parametrize("name", _referenced(r"pipelines/configs/(\w+)\.yaml"))
def test_referenced_config_exists(name):
    assert name in CONFIG_NAMES
    assert (ROOT / "pipelines" / "configs" / f"{name}.yaml").exists()


def test_train_commands_fit_the_gpu_workers_they_would_run_on():
    """A Ray Train worker asks for 1 GPU + cpus_per_worker CPUs: it must fit one GPU pod/node."""
    shapes = []  # (where, cpus per GPU worker, max GPU workers)
    for where, spec in _cluster_specs():
        for group in _gpu_groups(spec):
            container = group["template"]["spec"]["containers"][0]
            shapes.append((where, _quantity(container["resources"]["limits"]["cpu"]), group["maxReplicas"]))
    for name, node_type in _docs(LAUNCHER)[0]["available_node_types"].items():
        if node_type.get("resources", {}).get("GPU", 0) >= 1:
            shapes.append((f"launcher {name}", float(node_type["resources"]["CPU"]), node_type["max_workers"]))
    assert shapes
    checked = 0
    for where, module, argv in _pipeline_commands():
        tree = _resolved_train_config(argv) if module == "train" else None
        if not tree or not tree.get("scaling", {}).get("use_gpu"):
            continue
        cpus = float(tree["scaling"].get("cpus_per_worker", 1))
        workers = int(tree["scaling"].get("num_workers", 1))
        for shape_where, shape_cpus, max_workers in shapes:
            assert cpus <= shape_cpus, f"{where}: {cpus} CPUs per Train worker do not fit {shape_where} ({shape_cpus})"
            assert workers <= max_workers, f"{where}: {workers} GPU workers exceed {shape_where}'s max {max_workers}"
        checked += 1
    if (ROOT / "pipelines" / "configs" / "inshop.yaml").exists():
        assert checked, "no GPU training command was checked"


def test_cluster_readmes_refer_only_to_files_that_exist():
    for path in sorted(CLUSTER.rglob("*.md")):
        for ref in re.findall(r"\bcluster/[\w./\-]+\.(?:yaml|md)|\bray_job\.yaml\b|(?<![\w/])Dockerfile\b", path.read_text()):
            target = ROOT / ref if ref.startswith("cluster/") or ref == "ray_job.yaml" else CLUSTER / ref
            assert target.exists(), f"{path.relative_to(ROOT)} refers to missing {ref}"
