"""A local model folder checked from its files alone, before any weight is loaded.

The planner runs these checks so that a broken folder costs a second, not a model load (or, for `harness
quantize`, not a calibration pass): `config.json` must be a JSON object transformers can read as a Llava config;
the weight files must be there and whole (a safetensors file's header says how many bytes its tensors take, so a
truncated file is found by comparing that with the file's size; a sharded index names its shards); the tokenizer
and the image processor need their files. The loaders run them too, so a folder that changed after planning
still fails in one line. Tensor names and shapes are checked when the weights load (`checkpoint.load_float`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from qvlm_harness.errors import ModelError

CONFIG = "config.json"
# what transformers loads weights from, in the order it looks for them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# any one of these lets a tokenizer be built (fast tokenizer file, sentencepiece model, BPE/WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
RECREATE = "re-create the model folder (or pass another --model)"


def short(exc: BaseException, limit: int = 160) -> str:
    """An exception as `Type: first sentence`, short enough for a one-line error."""
    text = " ".join(str(exc).split())
    first = text.split(". ")[0]
    if len(first) > limit:
        first = first[:limit].rstrip() + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_config(folder: Path):
    """The folder's config as transformers reads it; a file that is not a JSON object, or that transformers
    refuses, is one line naming the file (never "not reachable on the hub": the folder is local)."""
    from transformers import AutoConfig

    path = folder / CONFIG
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder (no {CONFIG}); pass a Llava checkpoint folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not a text file; {RECREATE}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         f"{RECREATE}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object; {RECREATE}")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, its own validation errors...
        raise ModelError(f"{path} cannot be read by transformers ({short(exc)}); {RECREATE}") from None
    if getattr(config, "model_type", None) != "llava":
        raise ModelError(f"{folder} is a {config.model_type!r} checkpoint, not Llava (LlavaForConditionalGeneration); "
                         "use a llava-hf/* model or a converted checkpoint")
    return config


def check_safetensors(path: Path) -> None:
    """The file is a safetensors file holding every byte its header promises (a truncated copy does not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelError(f"{path} is truncated or not a safetensors file ({size} bytes); {RECREATE}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelError(f"{path} has a malformed safetensors header; {RECREATE}") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ModelError(f"{path} is {what} ({size} of {expected} bytes); {RECREATE}")


def _check_weight_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path} is missing; {RECREATE}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:  # torch.save's zip format: its directory is at the end, so a truncated file does not open
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError):
            raise ModelError(f"{path} is truncated or corrupt; {RECREATE}") from None


def check_weights(folder: Path) -> None:
    """The weight files transformers would load are present and whole (shards of an index included)."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise ModelError(f"{folder} holds no weights (none of {', '.join(WEIGHT_FILES)}); {RECREATE}")
    if not found.name.endswith(".index.json"):
        _check_weight_file(found)
        return
    try:
        shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"{found} is not a weight index (a JSON object with a weight_map); {RECREATE}") from None
    for shard in shards:
        if Path(shard).name != shard:
            raise ModelError(f"{found} names a shard outside the folder ({shard!r}); {RECREATE}")
        _check_weight_file(folder / shard)


def check_processor_files(folder: Path) -> None:
    """The files the tokenizer and the image processor are built from exist (their contents are checked when the
    processor loads, before the weights)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {RECREATE}")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ModelError(f"{folder} has no image processor config (none of {', '.join(PROCESSOR_FILES)}); "
                         f"{RECREATE}")


def check_model_folder(folder: Path | str):
    """Every check above; returns the config."""
    folder = Path(folder).expanduser()
    config = read_config(folder)
    check_weights(folder)
    check_processor_files(folder)
    return config


def load_processor(folder: Path | str):
    """The folder's processor, or one line saying why it cannot be built (loaded before the weights, so a broken
    tokenizer costs no weight load)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except Exception as exc:  # tokenizers and image processors raise a wide range of types for a bad file
        raise ModelError(f"the processor (tokenizer and image processor) of {folder} cannot be loaded "
                         f"({short(exc)}); {RECREATE}") from None
