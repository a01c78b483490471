"""An example preference loss living outside the package.

Select it with `--loss examples/my_loss.py:my_loss` (a file path) or, from the repository root,
`--loss examples.my_loss:my_loss` (a module); mix it with built-ins as
`--loss sigmoid:1.0,examples/my_loss.py:my_loss:0.5`. The contract is in the docstring of dpo/loss.py.
"""

import torch.nn.functional as F
from torch import Tensor

from dpo.loss import LossSettings, PreferenceLogps, preference_margin

TARGET_MARGIN = 1.0


def my_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-log sigmoid(beta * h - TARGET_MARGIN): DPO whose logistic loss is centred at an implicit reward margin of 1
    (at margin 1 the loss is ln 2, where plain DPO's is at margin 0)."""
    return F.softplus(TARGET_MARGIN - cfg.beta * preference_margin(x, cfg))
