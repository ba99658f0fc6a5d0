"""The epochs a run reports (train_summary.json, the model card's num_train_epochs): every example of every
process and every accumulated micro-batch counts, as the README's 800 steps x 16 samples over 768 rows."""

from __future__ import annotations

import pytest

from train.loop import epochs_trained


@pytest.mark.parametrize(("steps", "batch", "processes", "accumulation", "rows", "epochs"), [
    (800, 16, 1, 1, 768, 16.67),
    (800, 4, 2, 2, 768, 16.67),  # 4 per process x 2 processes x 2 accumulated = 16 examples a step
    (800, 4, 1, 4, 768, 16.67),
    (3, 2, 1, 1, 12, 0.5),
    (5, 2, 1, 1, 0, 10.0),  # no rows: never a division by zero
])
def test_epochs_count_every_example_of_every_process_and_micro_batch(steps, batch, processes, accumulation, rows,
                                                                     epochs):
    assert epochs_trained(steps, batch, processes, accumulation, rows) == epochs
