"""The encoder a pretraining run hands to its users: ``encoder.safetensors`` and its loader."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

__all__ = ["export_encoder", "load_encoder"]


def export_encoder(encoder: torch.nn.Module, mcfg, path: str) -> None:
    """Encoder weights as safetensors; the model config travels in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata={"format": "fastssl.ViewEncoder",
                                    "model_config": json.dumps(asdict(mcfg))})
    os.chmod(tmp, 0o644)  # an exported artefact, readable like the other outputs
    os.replace(tmp, path)


def load_encoder(path: str, map_location="cpu"):
    """A ViewEncoder from ``encoder.safetensors`` or from a pretrain ``checkpoint.pt``."""
    from fastssl.models.mvmae import ModelConfig, ViewEncoder

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "model_config" not in meta:
            raise ValueError(f"{path}: no model_config in the safetensors metadata (not a fastssl export)")
        mcfg = ModelConfig(**json.loads(meta["model_config"]))
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        mcfg = ModelConfig(**ckpt["model_config"])
        state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    encoder = ViewEncoder(mcfg)
    encoder.load_state_dict(state)
    return encoder
