"""The sections of ``docs/results.md``, one module per experiment; ``bench/report.py`` puts them together.

Scripts in ``bench/`` import them as ``results.<module>`` (``bench/`` is on ``sys.path`` when a script runs)."""
