"""Model side of dense-serve: specs, loading, predictors and their math.

Importing this package must stay cheap and torch-free; torch is imported by the submodules that need it.
"""
