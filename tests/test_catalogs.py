"""The GPU catalog, device detection and the architecture catalog."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fitune.errors import FituneError
from fitune.hardware import detect
from fitune.hardware.catalog import GPU, get_gpu, gpus, match_cuda_name
from fitune.hardware.detect import detect_environment
from fitune.models.catalog import get_model, models

GIB = 1 << 30
SHARED = Path(__file__).resolve().parents[2] / "shared"


# --- GPU catalog -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", gpus(), ids=lambda g: g.name)
def test_every_gpu_row_has_a_source_and_sane_values(gpu: GPU) -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", gpu.name)
    assert gpu.display_name.startswith("NVIDIA ")
    assert re.match(r"(https://|github\.com/)", gpu.source), gpu.source
    assert 8 * GIB <= gpu.memory_bytes <= 256 * GIB
    assert (7, 0) <= gpu.compute_capability <= (12, 9)
    assert gpu.bf16 == (gpu.compute_capability >= (8, 0))
    assert not gpu.flash_attention_2 or gpu.compute_capability >= (8, 0)
    assert (gpu.bf16_tflops is None) == (not gpu.bf16)
    assert 10 < gpu.fp16_tflops < 2000
    assert 100 <= gpu.bandwidth_gbps <= 10_000


def test_catalog_has_the_common_training_gpus() -> None:
    names = {g.name for g in gpus()}
    expected = {
        "t4", "v100-16gb", "v100-32gb", "rtx-3060-12gb", "rtx-3090", "rtx-4060-ti-16gb", "rtx-4070-ti",
        "rtx-4080", "rtx-4090", "a10g", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h100-80gb-pcie", "h200",
    }  # fmt: skip
    assert expected <= names


def test_estimated_throughput_is_labelled_in_the_source() -> None:
    for name in ("rtx-3060-12gb", "rtx-4060-ti-16gb", "rtx-4070-ti"):
        assert "ESTIMATE" in get_gpu(name).source
    assert "ESTIMATE" not in get_gpu("rtx-4090").source


@pytest.mark.skipif(not (SHARED / "gpus.csv").exists(), reason="shared/gpus.csv not beside the repo")
def test_every_gpu_source_and_figure_comes_from_the_shared_research() -> None:
    shared = list(csv.DictReader((SHARED / "gpus.csv").open()))
    for gpu in gpus():
        rows = [r for r in shared if gpu.source.startswith(r["source"])]
        assert rows, gpu.name
        assert any(
            float(r["memory_gb"]) * GIB == gpu.memory_bytes
            and float(r["memory_bandwidth_gbs"]) == gpu.bandwidth_gbps
            and r["compute_capability"] == "{}.{}".format(*gpu.compute_capability)
            and (r["fp16_bf16_dense_tflops"] == "" or float(r["fp16_bf16_dense_tflops"]) == gpu.fp16_tflops)
            for r in rows
        ), gpu.name


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("rtx-4090", "rtx-4090"),
        ("4090", "rtx-4090"),
        ("RTX 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("nvidia-geforce-rtx-4090", "rtx-4090"),
        ("Tesla T4", "t4"),
        ("A100-80GB", "a100-80gb"),
        ("a100_80gb_pcie", "a100-80gb-pcie"),
        ("h100", "h100-80gb"),
        ("H100 PCIe", "h100-80gb-pcie"),
        ("nvidia-h100-80gb-hbm3", "h100-80gb"),
        ("v100-sxm2-32gb", "v100-32gb"),
        ("H200", "h200"),
    ],
)
def test_get_gpu_accepts_aliases_and_any_case(name: str, canonical: str) -> None:
    assert get_gpu(name).name == canonical


def test_get_gpu_refuses_an_ambiguous_name_listing_the_candidates() -> None:
    with pytest.raises(FituneError) as err:
        get_gpu("a100")
    for candidate in ("a100-40gb", "a100-40gb-pcie", "a100-80gb", "a100-80gb-pcie"):
        assert candidate in str(err.value)
    with pytest.raises(FituneError, match="rtx-4060-ti-16gb"):
        get_gpu("rtx-4060-ti")  # the 8 GB card is not in the catalog; never guess it is the 16 GB one


def test_get_gpu_unknown_name_gives_the_three_closest() -> None:
    with pytest.raises(FituneError) as err:
        get_gpu("rtx-4909")
    message = str(err.value)
    assert "'rtx-4909'" in message and "rtx-4090" in message
    closest = message.split("Closest catalog names: ")[1].split(".")[0].split(", ")
    assert len(closest) == 3


@pytest.mark.parametrize(
    ("device_name", "memory_gib", "expected"),
    [
        ("Tesla T4", 14.6, "t4"),
        ("Tesla V100-SXM2-16GB", 15.8, "v100-16gb"),
        ("Tesla V100-PCIE-32GB", 31.7, "v100-32gb-pcie"),
        ("NVIDIA GeForce RTX 3060", 11.7, "rtx-3060-12gb"),
        ("NVIDIA GeForce RTX 3060", 7.7, None),  # the 8 GB RTX 3060 is another card
        ("NVIDIA GeForce RTX 4060 Ti", 15.6, "rtx-4060-ti-16gb"),
        ("NVIDIA GeForce RTX 4060 Ti", 7.6, None),
        ("NVIDIA GeForce RTX 4080 SUPER", 15.6, None),
        ("NVIDIA GeForce RTX 4090", 23.5, "rtx-4090"),
        ("NVIDIA A10G", 22.35, "a10g"),
        ("NVIDIA A10", 22.0, None),
        ("NVIDIA L4", 22.35, "l4"),
        ("NVIDIA L40", 44.7, None),
        ("NVIDIA A100-SXM4-40GB", 39.49, "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb-pcie"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", 79.2, "a100-80gb-pcie"),
        ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"),
        ("NVIDIA H100 PCIe", 79.1, "h100-80gb-pcie"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9.5, None),
        ("NVIDIA H100 NVL", 93.1, None),
        ("NVIDIA H200", 139.8, "h200"),
        ("NVIDIA RTX 6000 Ada Generation", 47.5, "rtx-6000-ada"),
        ("NVIDIA RTX A6000", 47.5, "rtx-a6000"),
    ],
)
def test_match_cuda_name(device_name: str, memory_gib: float, expected: str | None) -> None:
    gpu = match_cuda_name(device_name, int(memory_gib * GIB))
    assert (gpu.name if gpu else None) == expected


# --- device detection --------------------------------------------------------------------------------------


def test_detect_cpu() -> None:
    env = detect_environment("cpu")
    assert (env.device_type, env.device_name, env.gpu, env.simulated) == ("cpu", "cpu", None, False)
    assert 0 < env.free_memory_bytes <= env.total_memory_bytes
    assert env.torch_version == torch.__version__
    assert env.cuda_version == torch.version.cuda
    assert env.bitsandbytes_cuda is False
    assert env.num_devices == 1


def test_host_memory_falls_back_to_sysconf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "_meminfo", lambda: None)
    total, free = detect.host_memory()
    assert 0 < free <= total


def test_detect_simulated_t4() -> None:
    env = detect_environment("t4")
    assert env.simulated and env.device_type == "cuda" and env.device_name == "NVIDIA T4"
    assert env.gpu is not None and env.gpu.name == "t4"
    assert env.gpu.bf16 is False and env.gpu.flash_attention_2 is False
    assert env.gpu.compute_capability == (7, 5)
    assert env.total_memory_bytes == env.free_memory_bytes == 16 * GIB
    assert env.cuda_version == "12.4"
    assert env.bitsandbytes_cuda is True and env.bitsandbytes_version
    assert env.flash_attn_version is None


def test_detect_simulated_ampere_has_flash_attention() -> None:
    env = detect_environment("A100-80GB")
    assert env.gpu is not None and env.gpu.name == "a100-80gb"
    assert env.flash_attn_version is not None


def test_detect_rejects_a_bad_device_naming_it_and_the_forms() -> None:
    with pytest.raises(FituneError) as err:
        detect_environment("gpu0")
    message = str(err.value)
    assert "'gpu0'" in message and "cuda:N" in message and "Closest catalog names" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_detect_without_cuda() -> None:
    assert detect_environment("auto").device_type == "cpu"
    with pytest.raises(FituneError, match="sees no CUDA device"):
        detect_environment("cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detect_cuda() -> None:
    env = detect_environment("cuda")
    assert env.device_type == "cuda" and not env.simulated and env.gpu is not None
    assert 0 < env.free_memory_bytes <= env.total_memory_bytes
    assert env.num_devices == torch.cuda.device_count()


def test_unknown_gpu_is_synthesized_from_cuda_properties() -> None:
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", major=9, minor=0, total_memory=10 * GIB)
    gpu = detect._synthesized_gpu(props)
    assert gpu.memory_bytes == 10 * GIB and gpu.compute_capability == (9, 0)
    assert gpu.bf16 and gpu.flash_attention_2
    assert gpu.display_name == props.name


# --- architecture catalog ----------------------------------------------------------------------------------

MODEL_NAMES = [
    "smollm2-135m-instruct", "smollm2-360m", "smollm2-1.7b-instruct", "qwen2.5-7b", "qwen2.5-7b-instruct",
    "qwen3-0.6b", "qwen3-8b", "llama-2-7b-chat", "llama-3.1-8b", "llama-3.1-8b-instruct", "llama-3.1-70b",
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.2-3b-instruct", "phi-3-mini-4k-instruct", "mistral-7b-instruct-v0.3",
]  # fmt: skip


def test_model_catalog_names_and_sources() -> None:
    assert [m.name for m in models()] == MODEL_NAMES
    for model in models():
        assert "/" in model.hf_id and model.source
        assert model.config["model_type"] in ("llama", "mistral", "qwen2", "qwen3", "phi3")


def test_get_model_by_short_name_or_hub_id() -> None:
    assert get_model("Llama-3.1-8B").hf_id == "meta-llama/Llama-3.1-8B"
    assert get_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert get_model("META-LLAMA/META-LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert get_model("no-such-model") is None


def test_model_configs_are_fresh_copies() -> None:
    get_model("smollm2-135m-instruct").config["hidden_size"] = 1
    assert get_model("smollm2-135m-instruct").config["hidden_size"] == 576


@pytest.mark.skipif(
    not (SHARED / "model-configs").exists(), reason="shared/model-configs not beside the repo"
)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_configs_are_verbatim_copies(name: str) -> None:
    from importlib import resources

    model = get_model(name)
    shipped = (resources.files("fitune.models") / "configs" / f"{name}.json").read_bytes()
    assert shipped == (SHARED / "model-configs" / (model.hf_id.replace("/", "__") + ".json")).read_bytes()


def test_known_parameter_counts() -> None:
    assert get_model("llama-3.1-8b").param_count() == 8_030_261_248
    assert get_model("smollm2-135m-instruct").param_count() == 134_515_008


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_count_matches_the_model_transformers_builds(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = get_model(name)
    config = AutoConfig.for_model(**model.config)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert model.param_count() == sum(p.numel() for p in built.parameters())
