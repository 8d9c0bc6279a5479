"""The frozen API-1 plugin projects under ``api1/`` are fixtures, not part of this suite.

Their own tests run in a subprocess of :mod:`tests.compat.test_api1_plugins` (with the project on
``sys.path`` and its entry point installed), never collected directly here.
"""

collect_ignore_glob = ["api1/*"]
