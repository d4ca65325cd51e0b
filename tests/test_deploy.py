"""What the images install: the lock files (scripts/lock.sh) pin every dependency that
pyproject.toml declares for the server and its engines, at versions its specifiers allow."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not pinned"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


@pytest.mark.parametrize("lock, extras", [
    ("lock-cpu.txt", ["llamacpp", "transformers"]),
    ("lock-gpu.txt", ["llamacpp", "transformers", "vllm"]),
])
def test_the_lock_pins_every_dependency_of_pyproject_within_its_specifier(lock, extras):
    locked = pins(lock)
    wanted = PYPROJECT["dependencies"] + [d for e in extras for d in PYPROJECT["optional-dependencies"][e]]
    for dep in map(Requirement, wanted):
        name = canonicalize_name(dep.name)
        assert name in locked, f"{lock} lacks {dep.name}: run scripts/lock.sh"
        assert dep.specifier.contains(locked[name], prereleases=True), \
            f"{lock} pins {dep.name}=={locked[name]}, outside pyproject's {dep.specifier}: run scripts/lock.sh"


def test_the_cpu_image_gets_torchs_cpu_build_and_no_cuda_packages():
    locked = pins("lock-cpu.txt")
    assert locked["torch"].local == "cpu"
    assert not [n for n in locked if n.startswith("nvidia-") and n != "nvidia-ml-py"]


def _manifests(tmp_path=None, preload_70b=False):
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "deploy"))
    from k8s import manifests

    config = None
    if preload_70b:
        data = yaml.safe_load((ROOT / "configuration.yaml").read_text())
        data["models"]["llama3-70b"]["preload"] = True
        config = tmp_path / "configuration.yaml"
        config.write_text(yaml.safe_dump(data))
    return manifests("llmserve:latest", replicas=2, config=str(config) if config else None)


@pytest.mark.parametrize("preload_70b", [False, True], ids=["cpu-default", "llama3-70b"])
def test_the_kubernetes_manifests_validate_and_ask_for_the_configured_gpus(tmp_path, preload_70b):
    import kubernetes_validate

    deployment, service, hpa = _manifests(tmp_path, preload_70b)
    for doc in (deployment, service, hpa):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises on any schema error
    pod = deployment["spec"]["template"]["spec"]["containers"][0]
    assert pod["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["resources"].get("limits", {}).get("nvidia.com/gpu") == (2 if preload_70b else None)
    assert deployment["spec"]["replicas"] == 2 and service["spec"]["selector"] == {"app": "llmserve"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "llm_requests_running"


def test_a_manifest_with_a_broken_field_fails_validation():
    import kubernetes_validate

    deployment = _manifests()[0]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


def test_multi_node_vllm_passes_the_ray_executor_through_the_alias():
    """distributed_executor_backend: ray (vLLM's multi-node path) reaches the engine arguments."""
    from backends.vllm_backend import engine_kwargs
    from llmserve.config import ModelConfig
    from tests.test_config_and_routing import _engine_fields

    config = ModelConfig(source="meta-llama/Meta-Llama-3-70B-Instruct", backend="vllm", vllm={
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "extra": {"distributed_executor_backend": "ray"}})
    kwargs = engine_kwargs(config.vllm, config.source, _engine_fields())
    assert kwargs["distributed_executor_backend"] == "ray"
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (8, 2)
    assert config.gpus() == 8  # the service's host holds one stage; Ray places the other on its nodes
