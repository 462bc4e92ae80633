"""The pytest plugin, registered through the ``pytest11`` entry point (installing tiecheck is enough).

Laid out like pytest-benchmark's: ``plugin`` holds the hooks (options, report header, the
``tiecheck`` fixture, the end-of-run summary), ``fixture`` the object the fixture returns,
``store`` where snapshots live and what this run wrote, ``messages`` the words users read.
``plugin`` is imported at every pytest start of every project that has tiecheck installed, so
nothing here imports torch until a test uses the fixture.
"""
