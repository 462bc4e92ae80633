"""``tiecheck plan``: sharding plans checked before launch, which FSDP2 ``fully_shard`` calls keep a model's ties.

``wrap.check_plan`` replays, on any device (meta included) and without a process group, how
``fully_shard`` assigns parameters to units, and finds the tie groups whose parameter two units
would manage -- the plan torch refuses at the first forward.
"""

from tiecheck.plan import wrap
from tiecheck.plan.wrap import Unit, WrapCheck, apply_plan, check_plan, plan_units

__all__ = ["Unit", "WrapCheck", "apply_plan", "check_plan", "plan_units", "wrap"]
