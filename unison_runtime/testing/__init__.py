"""Builders of tiny random-weight models in the real on-disk formats.

They ship with the package because ``python -m unison_runtime selftest`` uses them too; the
weights are random, the formats and loading code are the real ones.
"""
