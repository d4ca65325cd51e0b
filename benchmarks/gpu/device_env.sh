# Sourced by the device scripts: the carried wheels in /tmp/site on the path, and bentoml /
# locust commands next to python3 (the harness starts them beside sys.executable).
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared multi-GPU hosts (KINDS.md), in every process we start;
# vLLM's symmetric-memory all-reduce would use multimem at tensor parallel > 1: off as well
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
bin=$(dirname "$(command -v python3)")
for tool in bentoml locust; do
  [ -x "$bin/$tool" ] || { printf '#!/usr/bin/env bash\nexec python3 -m %s "$@"\n' "$tool" > "$bin/$tool"; chmod +x "$bin/$tool"; }
done
