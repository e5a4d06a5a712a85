"""A model whose forward takes a fixed time, for jobs that must still be running when a test
cancels them or kills their server, however fast quantization itself gets.

It lives in its own module so that worker processes can unpickle it (trusted inputs only).
"""

from __future__ import annotations

import time

from torch import nn

CALIBRATION_ROWS = 16 * 40  # 40 calibration batches of 16 rows (the runner batches by 16)
FEATURES = 64


class SlowModel(nn.Module):
    def __init__(self, delay_s: float = 0.25) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.fc = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        time.sleep(self.delay_s)
        return self.fc(x)
