"""Loss functions, one small module per family, all registered by name in ``registry``.

Importing this package registers every built-in loss. Public API::

    from alignkit.losses import SequenceLogps, resolve_loss
    spec = resolve_loss("dpo")
    loss, metrics = spec.fn(SequenceLogps(...), beta=0.1)
"""

from alignkit.losses.registry import (  # noqa: F401
    LossSpec,
    RolloutLogps,
    SequenceLogps,
    available_losses,
    check_hparams,
    register_loss,
    resolve_loss,
)
from alignkit.losses import sft, dpo, reference_free, unpaired, listwise, rollout, reward  # noqa: F401,E402
from alignkit.losses import margin, cpl, bco, online, tdpo, dro, distill, pairwise, sppo, process  # noqa: F401,E402
