"""A tiny random-weight Llava checkpoint, built offline in seconds, for tests and smoke runs (`--model tiny`).

CLIP-style vision tower and Llama language model with widths that are multiples of 64 (bitsandbytes' CPU
kernels need that), a byte-level BPE tokenizer trained locally, and the LLaVA-1.5 chat template
("USER: <image>\\n... ASSISTANT:"), so the adapter is exercised on a different template than the default's.
Accuracy is meaningless; structure, shapes and plumbing are real.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from qvlm_harness.models.default import cache_root

LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}{{ '</s>' }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CORPUS = [
    "Context: Scientists sort shapes. Which shape is shown in the picture? A. circle B. triangle C. rectangle",
    "Answer with the option's letter from the given choices directly. yes no unanswerable",
    "What color is the shape? red green blue yellow black gray teal brown. How many corners? 0 3 4",
    "is an image with: 'nobody wants triangles around here' written on it. Is it hateful? Answer: yes no",
    "When the provided information is insufficient, respond with 'Unanswerable'. single word or phrase.",
]


def build_tiny(image_size: int = 32, patch: int = 8, seed: int = 0):
    """(model, processor) with random weights; deterministic for a seed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = LLAVA15_TEMPLATE
    n_patches = (image_size // patch) ** 2
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_patches, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=LLAVA15_TEMPLATE)
    return model, processor


def tiny_model_path(folder: Path | None = None, seed: int = 0) -> Path:
    """Save the tiny model once (to `folder` or the cache) and return the checkpoint folder."""
    folder = folder or cache_root() / "models" / f"tiny-random-s{seed}"
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model, processor = build_tiny(seed=seed)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
