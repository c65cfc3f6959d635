"""The supervised baseline: the labeled loss only."""

from __future__ import annotations

from mitoseg.methods.base import Method, StepContext, StepOutput, register_method


@register_method("supervised")
class Supervised(Method):
    def training_step(self, ctx: StepContext, labeled: dict, unlabeled: dict | None) -> StepOutput:
        logits = ctx.student(labeled["image"])
        loss = self.supervised_loss(logits, labeled["label"])
        return StepOutput(loss=loss, logs={"loss_x": loss.detach()})
