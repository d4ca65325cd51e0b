"""Kubernetes manifests for the image `bentoml containerize` builds, from configuration.yaml:

    python deploy/k8s.py --image llmserve:latest --replicas 2 > llmserve.yaml
    kubectl apply -f llmserve.yaml

A Deployment (liveness /livez, readiness /readyz, `nvidia.com/gpu` = the GPUs one replica
needs: tensor x pipeline parallel size of the preloaded aliases), a Service, and a
HorizontalPodAutoscaler on `llm_requests_running` (the service's own metric, per pod, through
a Prometheus adapter that exposes it as a Pods metric). Replicas share nothing: each loads its
own models and keeps its own queues, so any replica can answer any request.

When a preloaded alias runs vLLM over Ray (``vllm.distributed_executor_backend: ray``), one model
spans several pods: a KubeRay ``RayCluster`` takes the Deployment's place. Its head pod runs
`ray start --head` and then the service (which connects to it as RAY_ADDRESS=auto) with one
pipeline stage's GPUs; a worker group of pipeline_parallel_size - 1 pods holds the other stages.
The Service selects the head pod. No autoscaler: the cluster is one replica of the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmserve.config import load_settings  # noqa: E402

PORT = 3000
RAY_VERSION = "2.60.0"  # the ray extra's pin: KubeRay checks the image's Ray against it


def manifests(image: str, replicas: int = 1, max_replicas: int = 4, config: str | None = None,
              running_per_pod: int | None = None) -> list[dict[str, Any]]:
    settings = load_settings(config)
    gpus = settings.gpus()
    ray_alias = next((m for m in settings.models.values() if m.preload and m.vllm.uses_ray
                      and m.chosen_backend() == "vllm"), None)
    labels = {"app": "llmserve"}  # copied where used: safe_dump would write anchors for shared dicts
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "4Gi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    container = {
        "name": "llmserve",
        "image": image,
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "resources": resources,
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # models load after the process starts: ready once the preloaded ones answer
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "startupProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 5, "failureThreshold": 120},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llmserve", "labels": dict(labels)},
        "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    if ray_alias is not None:
        return [ray_cluster(container, labels, ray_alias.vllm), service]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "llmserve", "labels": dict(labels)},
        "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}}},
    }
    # scale out when the requests running per pod pass what one replica decodes at once
    target = running_per_pod or settings.concurrency()
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "llmserve"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llmserve"},
            "minReplicas": replicas, "maxReplicas": max(max_replicas, replicas),
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "llm_requests_running"},
                                                  "target": {"type": "AverageValue", "averageValue": str(target)}}}],
        },
    }
    return [deployment, service, hpa]


def ray_cluster(container: dict[str, Any], labels: dict[str, str], vllm) -> dict[str, Any]:
    """A KubeRay RayCluster (ray.io/v1) for one alias over Ray: the service in the head pod, the
    other pipeline stages in a worker group, each pod with one stage's GPUs (tensor parallel size)."""
    stage_gpus = vllm.tensor_parallel_size
    shell = ["/bin/bash", "-c", "--"]
    # KubeRay keeps these commands (annotation below) and puts its `ray start ... --block` in
    # KUBERAY_GEN_RAY_START_CMD (the inner shell keeps its quoted JSON): the head runs it in the
    # background and serves in the foreground once its Ray node answers; a worker is only a node
    head = {**container, "name": "ray-head", "command": list(shell),
            "args": ['ulimit -n 65536; /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD" & '
                     "until ray status >/dev/null 2>&1; do sleep 1; done; "
                     f"exec bentoml serve service:LLMService --host 0.0.0.0 --port {PORT}"],
            "env": [*container["env"], {"name": "RAY_ADDRESS", "value": "auto"}],
            "ports": [*container["ports"], {"name": "gcs", "containerPort": 6379}]}
    stage = {"requests": {"cpu": "2", "memory": "4Gi"}}
    if stage_gpus:
        stage["limits"] = {"nvidia.com/gpu": stage_gpus}
    worker = {"name": "ray-worker", "image": container["image"], "command": list(shell),
              "args": ['ulimit -n 65536; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'],
              "env": [dict(e) for e in container["env"]], "resources": stage}
    workers = vllm.pipeline_parallel_size - 1
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "llmserve", "labels": dict(labels), "annotations": {"ray.io/overwrite-container-cmd": "true"}},
        "spec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {"rayStartParams": {"num-gpus": str(stage_gpus)},
                              "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [head]}}},
            "workerGroupSpecs": [{"groupName": "stages", "replicas": workers, "minReplicas": workers,
                                  "maxReplicas": workers, "rayStartParams": {"num-gpus": str(stage_gpus)},
                                  "template": {"spec": {"containers": [worker]}}}],
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="llmserve:latest")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--config", help="configuration file (default: LLMSERVE_CONFIG or configuration.yaml)")
    args = p.parse_args()
    print(yaml.safe_dump_all(manifests(args.image, args.replicas, args.max_replicas, args.config), sort_keys=False))


if __name__ == "__main__":
    main()
