"""`make bench`: adaptopt measured against the tools people use today.

Run as ``python -m benchmarks --section all|peers|split|profile|passes|learning``.
Peer tools (onnxsim, onnxslim, onnxoptimizer, ORT's optimizers and quantizers) are
imported only inside this package, in child processes (``benchmarks.isolate``), so a
peer that crashes or hangs costs one row, not the run. Every latency is measured in
the parent process with :mod:`benchmarks.harness` (one ORT thread pool, variants
interleaved round-robin, medians).
"""
