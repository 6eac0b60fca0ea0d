"""Benchmark suite: ``python -m benchmarks`` measures adaptive_exec against its peers.

Modules, one concept each:

- ``workloads``   what is computed: deterministic items, a module-level task, the loop's results
- ``runners``     how it is computed: serial loop, adaptive_exec, joblib, pools, the oracle grid
- ``_child``      one measurement, in a fresh process, as a user's script would run it
- ``load``        another process keeping one CPU busy: the ``NAME@loaded`` scenarios
- ``reaction``    how soon adaptive_exec's worker count follows a load change
- ``harness``     which measurements, in which order, with time-outs, repeats and medians
- ``report``      the table on stdout, results.json, results.md and results.png

Nothing is imported here, so that the measured child processes start lean.
"""
