"""The spectral engine: curvature operators, solvers (eigenpairs, trace, density), alignment.

It imports nothing from the CLI: ``analyze`` and ``eigensam`` both call it.
"""
