"""Export a run's latest checkpoint as a Hugging Face Llama causal LM directory.

The model code here and transformers' LlamaForCausalLM compute the same function
(RMSNorm, rotary embeddings on halves, SwiGLU, grouped-query attention), so export
is a renaming of tensors plus a config.json and the run's tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from orchestrator import checkpoint, pretrained
from orchestrator.errors import ConfigError
from orchestrator.storage import Storage
from orchestrator.tokens import EOS

HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
    "mlp.w_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, index, rest = name.split(".", 2)  # layers.<i>.<module>.weight
    module, _ = rest.rsplit(".", 1)
    return f"model.layers.{index}.{HF_LAYER_NAMES[module]}.weight"


def hf_config(model: dict, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model["vocab_size"],
        "hidden_size": model["dim"],
        "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": model["dim"] // model["n_heads"],
        "max_position_embeddings": model["max_seq_len"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "tie_word_embeddings": model["tie_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model["init_std"],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def _refuse_inside(out_dir: Path, roots) -> None:
    """OUT_DIR may not be, or lie inside, any of ``roots`` (local Storage roots of the run)."""
    for root in roots:
        if root.is_local and (out_dir == Path(root.root) or Path(root.root) in out_dir.parents):
            raise ConfigError("OUT_DIR", f"{out_dir} is inside the run at {root.root}: exporting there would write "
                                         "over the run's files; choose a directory outside the run")


def export(source: str, out_dir: str | Path) -> str:
    """Writes model.safetensors, config.json and tokenizer files for the newest verified checkpoint
    of a run (its directory, or its storage on any filesystem) or for one checkpoint; returns the
    checkpoint used. The output may not be the run or lie inside it (or its storage)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    out_dir = Path(os.path.expanduser(str(out_dir))).resolve()
    _refuse_inside(out_dir, [Storage.at(source)])  # before anything is read
    pre = pretrained.locate(source)
    if pre.kind != "checkpoint":
        raise ConfigError("RUN_DIR", f"{source} is a Hugging Face model already, not one of our runs")
    _refuse_inside(out_dir, [pre.run, checkpoint.storage_of(pre.checkpoint)])  # the run, its checkpoints' storage
    model_cfg = pre.arch
    # Full weights; a LoRA run's adapters are merged into its base here.
    weights = pretrained.load_weights(pre)
    if model_cfg["tie_embeddings"]:
        weights.pop("output.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({hf_name(k): v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    eos_id = Tokenizer.from_file(pre.tokenizer_path).token_to_id(EOS)
    (out_dir / "config.json").write_text(json.dumps(hf_config(model_cfg, eos_id), indent=1))
    shutil.copyfile(pre.tokenizer_path, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "pad_token": EOS,
        "model_max_length": model_cfg["max_seq_len"], "clean_up_tokenization_spaces": False,
    }, indent=1))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS,
                                                                  "pad_token": EOS}, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}))
    return pre.checkpoint.root
