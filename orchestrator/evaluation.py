"""A job's starting weights (``model.init_from``), unchanged, scored on the job's held-out
split the way the trainer scores it: the "before" of a finetuning job's "after"."""
from __future__ import annotations

from orchestrator.config import JobConfig


def evaluate_init(job: JobConfig) -> dict:
    """{val_loss, val_exact_match, val_examples} of model.init_from on job's held-out rows,
    in one process on CPU (the same micro-batches as a one-rank job's evaluation)."""
    import torch

    from orchestrator import pretrained
    from orchestrator.data import open_blocks, prepare
    from orchestrator.models import Llama
    from orchestrator.trainer import model_args
    from strategies.base import evaluate

    pre = pretrained.locate(job.model.init_from)
    data = prepare(job.data, job.model.vocab_size, pre.tokenizer_path)
    examples = open_blocks(data, job.data.seq_len, job.data.val_fraction)
    model = Llama(model_args(job))
    model.load_state_dict(pretrained.load_weights(pre))
    model.init_buffers()
    model.eval()
    mb = job.trainer.micro_batch_size
    n = examples.n_val - examples.n_val % mb
    batches = [examples.batch(list(range(i, i + mb)), split="val") for i in range(0, n, mb)]
    if not batches:
        raise ValueError(f"the held-out split has {examples.n_val} rows, fewer than one micro-batch ({mb})")
    with torch.no_grad():
        scores = evaluate(model, batches, torch.device("cpu"), None)
    return {**scores, "val_examples": n}
