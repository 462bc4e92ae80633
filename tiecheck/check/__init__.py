"""``tiecheck check``: each target held to its expectations (a snapshot, ties that must or must not
hold) and to its findings, for CI.

* :mod:`~tiecheck.check.policy`: ``[tool.tiecheck]`` in pyproject.toml, and the command line's own;
* :mod:`~tiecheck.check.snapshot`: tie snapshots, read, compared and written;
* :mod:`~tiecheck.check.outcome`: one target checked, and what failed.

The expectations themselves are an analysis (:mod:`tiecheck.analyses.expect`), shared with
``tiecheck.analyze(expect_tied=...)`` and the pytest assertions.
"""
