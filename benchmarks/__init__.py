"""dlcore benchmark suites: ``python -m benchmarks`` (tables, JSON, plots) and pytest-benchmark
files ``benchmarks/bench_<family>.py`` (``pytest benchmarks/``)."""
