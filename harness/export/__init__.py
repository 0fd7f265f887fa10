"""Export to serving formats (`harness export`): compressed-tensors for the whole Llava, GGUF for llama.cpp.

`source` loads a checkpoint and reads each linear's stored integer grid; `compressed` and `gguf_llama` write
them without re-quantizing (`ggml_blocks` packs GGML's block formats, `gguf_vocab` the tokenizer).
"""
