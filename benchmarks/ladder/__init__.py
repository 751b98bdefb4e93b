"""The benchmark ladder's parts, used by ``benchmarks/run.py`` (the entry point).

``common`` (shared constants), ``rungs`` (the models benchmarked), ``data`` (the column files
handed to the workers), ``child`` (running a worker process), ``workers`` (the Python worker
processes), ``rdriver`` (the lme4 worker and the probes), ``report`` (the table, footer and
targets).
"""
