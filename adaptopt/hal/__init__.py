"""Hardware abstraction layer: counter backends that say whether they are available and why
(``registry.BACKENDS``: perf, rusage, analytic, nvml, ncu)."""
