"""Adapters that run ``tiecheck.runtime.TieGuard`` where users train.

Each module imports its training library at its top and nothing else does, so
``import tiecheck.runtime`` imports neither transformers nor Lightning:

- ``tiecheck.integrations.transformers.TiecheckCallback``: a ``transformers.TrainerCallback``
  (extra ``tiecheck[transformers]``);
- ``tiecheck.integrations.lightning.TiecheckCallback``: a Lightning ``Callback``
  (extra ``tiecheck[lightning]``).
"""
