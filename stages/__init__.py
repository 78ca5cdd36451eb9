"""The DVC stages, one module each, run by dvc.yaml as ``python -m stages.<name>``.

``-m`` puts the working directory first on sys.path, so a stage imports the ``triage``
package beside it (in a ``dvc exp run --temp`` copy or a CI clone too), not the checkout
the package was pip-installed from (docs/pipeline.md, "Code layout").
"""
