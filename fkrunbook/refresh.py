"""Re-execute the committed notebooks in demo mode and keep their outputs.

nbval compares each notebook's outputs against the committed ones, so the
committed notebooks must carry the outputs of a reference demo run. Run it
with ``make notebooks`` after changing the package, the SQL or a notebook.
"""

from __future__ import annotations

import os
import sys

import nbformat
import papermill

from . import connection
from .chain import KERNEL_ARGUMENTS, NOTEBOOKS, RECOVER_NOTEBOOK
from .paths import OUTPUTS_DIR, RUNBOOKS_DIR
from .runtime import utc_stamp

# Notebooks outside the default chain that nbval also checks.
STANDALONE_NOTEBOOKS = ("05-rollback", RECOVER_NOTEBOOK)


def strip_run_metadata(path) -> None:
    """Drop papermill's per-run timings so a refresh only changes outputs."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("papermill", None)
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def main() -> int:
    for name in ("DATABASE_URL", connection.DEMO_URL_VARIABLE) + connection.TARGET_VARIABLES:
        os.environ.pop(name, None)
    scratch = OUTPUTS_DIR / f"{utc_stamp()}-refresh"
    for name in NOTEBOOKS + STANDALONE_NOTEBOOKS:
        path = RUNBOOKS_DIR / f"{name}.ipynb"
        print(f"refreshing {path.name}", flush=True)
        executed = scratch / f"{name}.ipynb"
        scratch.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(str(path), str(executed), kernel_name="python3",
                                   cwd=str(RUNBOOKS_DIR), progress_bar=False,
                                   extra_arguments=KERNEL_ARGUMENTS)
        strip_run_metadata(executed)
        path.write_bytes(executed.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
