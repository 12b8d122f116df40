"""Preference tuning on adapters (DPO, IPO, ORPO): the losses, the per-sequence log-probs and the data."""

from jaxpeft.preference.logps import reference_params, row_logps, sequence_stats
from jaxpeft.preference.losses import LOSSES, dpo_loss, ipo_loss, orpo_loss, preference_loss

__all__ = ["LOSSES", "dpo_loss", "ipo_loss", "orpo_loss", "preference_loss", "reference_params", "row_logps",
           "sequence_stats"]
