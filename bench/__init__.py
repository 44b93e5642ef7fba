"""Benchmarks of elasticd against baselines measured in the same run (``python -m bench``).

Each benchmark module owns one question of issue 8 and exposes ``run(work, *, quick)``
returning a :class:`bench.common.Section`; ``bench.__main__`` runs them and renders
``bench/RESULTS.md``. See ``bench/README.md``.
"""
