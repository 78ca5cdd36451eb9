"""Shared library behind the DVC stages of the semi-supervised triage pipeline.

Each module holds pure functions / scikit-learn style objects; the scripts in
``stages/`` are thin command-line wrappers that read ``params.yaml``, call these,
and write DVC outputs. Tests import this package directly.
"""

__version__ = "0.1.0"
