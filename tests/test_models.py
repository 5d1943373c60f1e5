"""Finding models: local folders, the embedded name, LoRA run folders that hold only an adapter, and hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import models
from pipeline.errors import UserError
from pipeline.models import (ADAPTER_CONFIG, ADAPTER_DIR, EMBEDDED_MODEL, adapter_base, adapter_folder, portable_name,
                             resolve_model)


def test_portable_name_never_is_the_cache_folder():
    assert portable_name("smollm2") == portable_name("embedded") == EMBEDDED_MODEL
    assert portable_name("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert portable_name("runs/base") == "runs/base"


def write_adapter(folder, base: str | None) -> None:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA"} if base is None else {"peft_type": "LORA", "base_model_name_or_path": base}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))


def test_a_lora_run_folder_is_a_model_whose_base_the_adapter_names(tmp_path, tiny_model_dir):
    run = tmp_path / "sft"
    write_adapter(run / ADAPTER_DIR, str(tiny_model_dir))
    assert resolve_model(str(run)) == run  # no config.json, yet a model: the adapter on its base
    assert adapter_folder(run) == run / ADAPTER_DIR
    assert adapter_base(run / ADAPTER_DIR) == tiny_model_dir
    (run / "config.json").write_text("{}")  # a merged model beside it wins
    assert adapter_folder(run) is None


def test_an_adapter_whose_base_cannot_be_found_is_one_line(tmp_path):
    bare = tmp_path / "bare"
    write_adapter(bare, "モデル/どこにもない")
    with pytest.raises(UserError, match=r"adapter_config.json: base_model_name_or_path: --model モデル/どこにもない: not a local"):
        adapter_base(bare)
    nameless = tmp_path / "nameless"
    write_adapter(nameless, None)
    with pytest.raises(UserError, match="base_model_name_or_path: missing"):
        adapter_base(nameless)
    with pytest.raises(UserError, match="folder has no config.json"):
        resolve_model(str(tmp_path))


def test_a_bare_adapter_takes_its_base_tokenizer(tmp_path, tiny_model_dir):
    from pipeline.models import load_tokenizer

    bare = tmp_path / "bare"
    write_adapter(bare, str(tiny_model_dir))
    tokenizer = load_tokenizer(str(bare))
    assert tokenizer("日本語").input_ids == load_tokenizer(str(tiny_model_dir))("日本語").input_ids


# ----------------------------------------------------------------------------- hub ids

ROOT = Path(__file__).resolve().parents[1]


def test_offline_a_hub_id_not_in_the_cache_is_one_line_naming_the_setting_and_the_cache(tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"instruction": "富士山の高さは？", "input": "", "output": "3776 m"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    cache = tmp_path / "hub-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--model", "Qwen/Qwen2.5-0.5B-Instruct",
                             "--data", str(data), "--out", str(tmp_path / "eval.json"), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model Qwen/Qwen2.5-0.5B-Instruct: the Hugging Face hub is switched off (HF_HUB_OFFLINE=1)")
    assert f"not in the cache {cache};" in last


def hub_cache_with(tmp_path, model_dir, repo_id: str) -> Path:
    """A Hugging Face cache holding `model_dir` as `repo_id`, laid out as the hub client writes it."""
    owner, name = repo_id.split("/")
    cache = tmp_path / "hub-cache"
    commit = "0" * 40
    repo = cache / f"models--{owner}--{name}"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return cache


def test_offline_a_cached_hub_id_loads_from_the_cache(tmp_path, tiny_model_dir):
    cache = hub_cache_with(tmp_path, tiny_model_dir, "acme/tiny-llama")
    code = ("from pipeline.models import load_model, resolve_model; import sys; "
            "print(resolve_model('acme/tiny-llama')); print(load_model('acme/tiny-llama', device='cpu').config.num_hidden_layers)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    folder, layers = result.stdout.strip().splitlines()[-2:]
    assert Path(folder) == cache / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    assert layers == "2"


def test_a_local_folder_named_like_a_hub_id_is_the_local_folder(tmp_path, tiny_model_dir, monkeypatch):
    local = tmp_path / "acme" / "tiny"
    shutil.copytree(tiny_model_dir, local)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/tiny") == Path("acme/tiny")


@pytest.mark.parametrize("name", ["./runs/missing", "/no/such/model/folder", "名前/モデル/版"])
def test_a_missing_path_that_is_no_hub_id_says_what_model_takes(name):
    with pytest.raises(UserError, match="not a local model folder nor a hub id"):
        resolve_model(name)


# ----------------------------------------------------------------------------- threads and precision


def fake_cpu(monkeypatch, tmp_path, flags: str, amx_tiles: bool = False) -> None:
    """/proc/cpuinfo listing `flags` for each of two cores, and torch's AMX probe answering `amx_tiles`."""
    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2)), encoding="utf-8")
    monkeypatch.setattr(models, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_tiles)


@pytest.mark.parametrize("flags, amx_tiles, expected", [
    ("fpu avx2 avx512f avx512_vnni avx512_bf16 sse", False, "bf16"),  # AMD Zen 4
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile sse", False, "bf16"),  # Sapphire Rapids
    ("fpu avx2 avx512f avx512_vnni sse", True, "bf16"),  # AMX seen by torch only
    ("fpu avx2 avx512f avx512_vnni sse", False, "fp32"),  # AVX-512 without BF16: emulated bf16 is slower
    ("fpu avx2 fma sse", False, "fp32"),
])
def test_local_precision_is_bf16_only_where_bf16_matmuls_are_native(
        monkeypatch, tmp_path, flags, amx_tiles, expected):
    fake_cpu(monkeypatch, tmp_path, flags, amx_tiles)
    assert models.local_dtype("cpu") == expected
    assert models.local_dtype("cpu", "fp32") == "fp32" and models.local_dtype("cpu", "bf16") == "bf16"


def test_a_cpu_without_cpuinfo_stays_fp32(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, "")
    monkeypatch.setattr(models, "CPUINFO", str(tmp_path / "absent"))
    assert models.cpu_flags() == set() and models.local_dtype("cpu") == "fp32"


@pytest.mark.parametrize("flags, expected", [
    ("fpu avx2 avx512f avx512_vnni avx512_bf16 sse", "bf16"),  # AMD Zen 4: bf16 autocast trains 2.7x faster
    ("fpu avx2 avx512f avx512_vnni sse", "fp32"),  # bf16 would be emulated
])
def test_training_precision_follows_the_cpu_unless_asked(monkeypatch, tmp_path, flags, expected):
    fake_cpu(monkeypatch, tmp_path, flags)
    assert models.training_precision("cpu") == expected
    assert models.training_precision("cpu", "fp32") == "fp32" and models.training_precision("cpu", "bf16") == "bf16"


def fake_proc_stat(monkeypatch, tmp_path, busy_jiffies: int, idle_jiffies: int) -> None:
    """A 2-CPU /proc/stat that advances by `busy_jiffies` and `idle_jiffies` while free_cores() sleeps."""
    stat = tmp_path / "stat"

    def write(busy: int, idle: int) -> None:
        stat.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n"
                        "intr 12345\n", encoding="ascii")

    write(1000, 5000)
    monkeypatch.setattr(models, "PROC_STAT", str(stat))
    monkeypatch.setattr(models.time, "sleep", lambda seconds: write(1000 + busy_jiffies, 5000 + idle_jiffies))


@pytest.mark.parametrize("busy, idle, cores_busy", [(0, 50, 0), (2, 48, 0), (25, 25, 1), (30, 20, 1), (50, 0, 2)])
def test_busy_cores_are_the_non_idle_share_of_the_cpus_while_we_wait(monkeypatch, tmp_path, busy, idle, cores_busy):
    fake_proc_stat(monkeypatch, tmp_path, busy, idle)
    assert models.busy_cores() == cores_busy


@pytest.mark.parametrize("busy, idle, threads", [(0, 50, 2), (25, 25, 1), (50, 0, 1)])
def test_threads_are_the_cores_not_kept_busy_by_other_work_now(monkeypatch, tmp_path, busy, idle, threads):
    # Not the load average: a stage started just after another must not count its predecessor's cores.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    fake_proc_stat(monkeypatch, tmp_path, busy, idle)
    assert models.free_cores() == threads


@pytest.mark.parametrize("load, threads", [(0.0, 2), (0.7, 2), (0.99, 2), (1.0, 1), (1.6, 1), (9.0, 1)])
def test_without_proc_stat_the_whole_part_of_the_load_average_is_busy(monkeypatch, tmp_path, load, threads):
    # An idle container reads a load average of 0.5-0.7: it must still get both cores.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(models, "PROC_STAT", str(tmp_path / "absent"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert models.free_cores() == threads


@pytest.mark.parametrize("setting, threads", [("3", 3), ("1", 1), ("0", 2), ("many", 2), ("", 2)])
def test_omp_num_threads_wins_when_it_is_a_positive_count(monkeypatch, tmp_path, setting, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", setting)
    fake_proc_stat(monkeypatch, tmp_path, busy_jiffies=0, idle_jiffies=50)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.6, 0.0, 0.0))
    assert models.free_cores() == threads
