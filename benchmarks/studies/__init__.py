"""One-off investigations and their results (not the harness a user runs).

``compile_time``: where many-leaf compile time goes on XLA:CPU (issue 5).
``single_pass``: single-pass Adam on CPU: formulations, XLA flags, an FFI kernel (issue 5).
Results: ``benchmarks/studies/results/<machine>/``.
"""
