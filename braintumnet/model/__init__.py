"""BrainTumNet (§2.2): ``BrainTumNet(...)(x)`` returns ``BrainTumNetOutput(seg_logits, cls_logits)``."""

from braintumnet.model.braintumnet import GATE_LABELS, MODES, BrainTumNet, BrainTumNetOutput

__all__ = ["GATE_LABELS", "MODES", "BrainTumNet", "BrainTumNetOutput"]
