"""The import path docs/distributed.md gave for sharding plans before ``tiecheck plan`` had its package.

``tiecheck.shard.check_plan`` and ``tiecheck.shard.wrap.apply_plan`` keep working; new code imports
:mod:`tiecheck.plan`.
"""

from tiecheck.plan import Unit, WrapCheck, check_plan, plan_units, wrap

__all__ = ["Unit", "WrapCheck", "check_plan", "plan_units", "wrap"]
