"""Kubernetes manifests for the image `bentoml containerize` builds, from configuration.yaml:

    python deploy/k8s.py --image llmserve:latest --replicas 2 > llmserve.yaml
    kubectl apply -f llmserve.yaml

A Deployment (liveness /livez, readiness /readyz, `nvidia.com/gpu` = the GPUs one replica
needs: tensor x pipeline parallel size of the preloaded aliases), a Service, and a
HorizontalPodAutoscaler on `llm_requests_running` (the service's own metric, per pod, through
a Prometheus adapter that exposes it as a Pods metric). Replicas share nothing: each loads its
own models and keeps its own queues, so any replica can answer any request.
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


def manifests(image: str, replicas: int = 1, max_replicas: int = 4, config: str | None = None,
              running_per_pod: int | None = None) -> list[dict[str, Any]]:
    settings = load_settings(config)
    gpus = settings.gpus()
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
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "llmserve", "labels": dict(labels)},
        "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "llmserve", "labels": dict(labels)},
        "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
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
