"""Tiny random-weight Llava checkpoints, built offline in seconds, for tests and smoke runs (`--model tiny`,
`--model tiny-gemma`): one per architecture family the model seam must handle.

* `tiny` (`build_tiny`): CLIP vision tower + Llama language model, the LLaVA-1.5 chat template
  ("USER: <image>\\n... ASSISTANT:"), so the adapter is exercised on a different template than the default's.
* `tiny-gemma` (`build_tiny_gemma`): DINOv2 vision tower (LayerNorm + LayerScale, as the embedded default) +
  Gemma3 language model (offset RMSNorm ``x * (1 + w)``, sandwich norms, q/k norms, alternating sliding-window
  and full attention with different rotary bases), a Gemma-style template that renders ``{{ bos_token }}`` and
  ends turns with ``<end_of_turn>``, and a tokenizer that adds BOS itself (the double-BOS trap).

Widths are multiples of 64 (bitsandbytes' CPU kernels need that); tokenizers are byte-level BPE trained
locally. Accuracy is meaningless; structure, shapes and plumbing are real.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from qvlm_harness.models.architectures import NORMS, class_key
from qvlm_harness.models.default import cache_root
from qvlm_harness.models.structure import NormKind

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


# A Gemma-style template: it renders the BOS token itself and ends every turn with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _train_bpe(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=512, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


def build_tiny(image_size: int = 32, patch: int = 8, seed: int = 0):
    """(model, processor) with random weights; deterministic for a seed."""
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
    bpe = _train_bpe(["<pad>", "<s>", "</s>", "<image>"])
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


def build_tiny_gemma(image_size: int = 32, patch: int = 8, seed: int = 0):
    """(model, processor): DINOv2 + Gemma3 with random weights; deterministic for a seed.

    Norm weights, biases and LayerScale factors are random too (a fresh Gemma norm has w = 0 and a fresh
    LayerNorm w = 1, b = 0, under which a fold that divides w instead of (1 + w), or forgets the bias, would go
    unnoticed). Sliding window 8 with prompts of ~40 tokens, so the two attention kinds really differ."""
    from tokenizers import processors
    from transformers import (
        CLIPImageProcessorPil,
        Dinov2Config,
        Gemma3TextConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    bpe = _train_bpe(["<pad>", "<bos>", "<eos>", "<image>", "<start_of_turn>", "<end_of_turn>"])
    bos = bpe.token_to_id("<bos>")
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  extra_special_tokens={"image_token": "<image>", "start_of_turn": "<start_of_turn>",
                                                        "end_of_turn": "<end_of_turn>"})
    tok.chat_template = GEMMA_TEMPLATE
    n_patches = (image_size // patch) ** 2
    vision = Dinov2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=image_size, patch_size=patch, layerscale_value=1.0)
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=512,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_patches, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if class_key(m) in NORMS:  # offset norms centre on 0, plain ones on 1
                offset = NORMS[class_key(m)] is NormKind.RMSNORM_OFFSET
                m.weight.copy_(torch.randn_like(m.weight) * 0.3 + (0.0 if offset else 1.0))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn_like(m.bias) * 0.1)
            elif name.endswith("layer_scale1") or name.endswith("layer_scale2"):
                m.lambda1.uniform_(0.5, 1.5)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=GEMMA_TEMPLATE)
    return model, processor


BUILDERS = {"tiny": build_tiny, "tiny-gemma": build_tiny_gemma}


def tiny_model_path(folder: Path | None = None, seed: int = 0, variant: str = "tiny") -> Path:
    """Save a tiny model once (to `folder` or the cache) and return the checkpoint folder."""
    folder = folder or cache_root() / "models" / (f"tiny-random-s{seed}" if variant == "tiny"
                                                  else f"{variant}-random-s{seed}")
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model, processor = BUILDERS[variant](seed=seed)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def tiny_gemma_model_path(folder: Path | None = None, seed: int = 0) -> Path:
    """`tiny_model_path` for the DINOv2 + Gemma3 variant (`--model tiny-gemma`)."""
    return tiny_model_path(folder, seed, variant="tiny-gemma")
