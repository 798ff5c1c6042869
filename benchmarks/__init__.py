"""lepton_ray's benchmarks: one script per subject (``python benchmarks/SCRIPT.py``), and the suite that runs them all
(``python -m benchmarks``, see :mod:`benchmarks.suite`)."""
