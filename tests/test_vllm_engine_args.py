"""How an alias's `vllm:` settings become vLLM engine arguments (no engine started)."""

from __future__ import annotations

import pytest

from backends.errors import BadInput
from backends.vllm_backend import engine_kwargs
from llmserve.config import VllmArgs
from llmserve.errors import to_api_error

V1_FIELDS = {"model", "tokenizer", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "enforce_eager",
             "kv_offloading_size"}


def installed_vllm_fields() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def test_swap_space_becomes_kv_offloading_over_every_gpu_of_the_alias():
    args = VllmArgs(tensor_parallel_size=2, swap_space=4, dtype="bfloat16")
    kwargs = engine_kwargs(args, "/models/x", installed_vllm_fields())
    assert kwargs["kv_offloading_size"] == 8  # swap_space was GiB per GPU; offloading is the total
    assert "swap_space" not in kwargs and kwargs["tensor_parallel_size"] == 2


def test_swap_space_on_a_vllm_with_neither_setting_is_a_configuration_error_naming_it():
    with pytest.raises(BadInput) as info:
        engine_kwargs(VllmArgs(swap_space=4), "/models/x", V1_FIELDS - {"kv_offloading_size"})
    assert info.value.param == "vllm.swap_space" and "vllm.swap_space" in info.value.message
    api = to_api_error(info.value)  # how it reaches whoever asked for the load
    assert (api.status, api.param) == (400, "vllm.swap_space")


def test_swap_space_goes_through_where_vllm_still_has_it():
    kwargs = engine_kwargs(VllmArgs(swap_space=4), "/models/x", V1_FIELDS | {"swap_space"})
    assert kwargs["swap_space"] == 4 and "kv_offloading_size" not in kwargs
