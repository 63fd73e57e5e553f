"""A job's starting weights (``model.init_from``), unchanged, scored on the job's held-out
split the way the trainer scores it: the "before" of a finetuning job's "after"."""
from __future__ import annotations

from orchestrator.config import JobConfig


def evaluate_init(job: JobConfig) -> dict:
    """{val_loss, val_exact_match, val_examples} (DPO: also val_preference_accuracy and
    val_reward_margin) of model.init_from on job's held-out rows,
    in one process on CPU (the same micro-batches as a one-rank job's evaluation)."""
    import numpy as np
    import torch

    from orchestrator import pretrained
    from orchestrator.alignment.losses import objective_of
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
    if hasattr(examples, "reference"):  # DPO: the starting weights are the reference
        from orchestrator.alignment.losses import pair_logps

        rows = np.arange(examples.n_train, examples.n_train + n)
        with torch.no_grad():
            for i in range(0, n, mb):
                x, y = examples.rows(rows[i:i + mb])
                examples.reference[rows[i:i + mb]] = pair_logps(model(x), y)
    batches = [examples.batch(list(range(i, i + mb)), split="val") for i in range(0, n, mb)]
    if not batches:
        raise ValueError(f"the held-out split has {examples.n_val} rows, fewer than one micro-batch ({mb})")
    with torch.no_grad():
        scores = evaluate(model, batches, torch.device("cpu"), None, objective_of(job.alignment))
    return {**scores, "val_examples": n}
