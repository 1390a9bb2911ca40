"""A running batch that keeps what each sample's tokens were drawn from, for tests that compare a
sample in a batch with the same sample alone."""

import torch

from koff.runtime import DecodeBatch


class RecordingBatch(DecodeBatch):
    """Keeps, per sample, the logits its tokens were drawn from (greedy tokens of a tiny random model
    hardly depend on the context; its logits do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def _read(self, rows, logits, chosen):
        for i, row in enumerate(rows):
            if row is not None and not row.done:  # None: a free slot
                self.logits.setdefault(row.key, []).append(logits[i].clone())
        return super()._read(rows, logits, chosen)
