"""Export a run's latest checkpoint as a Hugging Face Llama causal LM directory.

The model code here and transformers' LlamaForCausalLM compute the same function
(RMSNorm, rotary embeddings on halves, SwiGLU, grouped-query attention), so export
is a renaming of tensors plus a config.json and the run's tokenizer files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator import checkpoint, pretrained
from orchestrator.errors import ConfigError

EOS = "<|endoftext|>"
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


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes model.safetensors, config.json and tokenizer files; returns the checkpoint used."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    job_file, tok_file = run_dir / "job.json", run_dir / "tokenizer.json"
    for f in (job_file, tok_file):
        if not f.is_file():
            raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory: {f.name} is missing")
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise ConfigError("RUN_DIR", f"{run_dir} has no verified checkpoint under checkpoints/")
    model_cfg = json.loads(job_file.read_text())["model"]
    # Full weights; a LoRA run's adapters are merged into its base here.
    weights = pretrained.load_weights(pretrained.locate(str(ckpt)))
    if model_cfg["tie_embeddings"]:
        weights.pop("output.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({hf_name(k): v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    eos_id = Tokenizer.from_file(str(tok_file)).token_to_id(EOS)
    (out_dir / "config.json").write_text(json.dumps(hf_config(model_cfg, eos_id), indent=1))
    shutil.copyfile(tok_file, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "pad_token": EOS,
        "model_max_length": model_cfg["max_seq_len"], "clean_up_tokenization_spaces": False,
    }, indent=1))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS,
                                                                  "pad_token": EOS}, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}))
    return ckpt
