"""Single-device model code. Parallelism is applied from outside, by strategies."""
from orchestrator.models.llama import Llama, LlamaArgs, causal_lm_loss, llama_args, num_params

__all__ = ["Llama", "LlamaArgs", "causal_lm_loss", "llama_args", "num_params"]
