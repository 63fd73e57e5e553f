"""Alignment tuning: DPO on preference pairs against a frozen reference, and GRPO on groups of
samples that the sister inference pool generates each step.

- ``losses``: the training objectives every alignment-capable engine runs (the language-model
  loss, DPO, GRPO's clipped policy gradient), each a loss and its statistics from logits.
- ``data``: preference pairs (rendered with the SFT chat template) and GRPO's prompts.
- ``rewards``: the built-in reward functions and the loader for ``alignment.reward``.
- ``rollout``: the rollout pool a GRPO job starts, and each rank's client to it.
- ``checks``: validation of the ``alignment`` group before any worker starts.
"""
