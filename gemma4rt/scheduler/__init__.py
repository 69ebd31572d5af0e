"""scheduler: owns every request's state and every KV page (one page pool per attention geometry,
prefix cache). Receives AddRequest/AbortRequest and StepResult; emits StepPlan and TokenOutputs.
CPU only: never imports model, ops or torch.cuda."""
from gemma4rt.scheduler.core import Scheduler
from gemma4rt.scheduler.pages import PagePool

__all__ = ["Scheduler", "PagePool"]
