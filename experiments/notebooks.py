"""Execute the notebooks: ``python -m experiments.notebooks [--smoke] [--check] [NAME ...]``.

Without ``--smoke`` every notebook in ``notebooks/`` runs at full size and is saved with its
outputs (the committed notebooks hold the outputs of such a run). With ``--smoke`` it runs with
``FLB_SMOKE=1`` (each notebook shrinks itself), in a temporary working directory, and nothing is
written back: the test suite does this so the notebooks never rot. Prints each notebook's time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(path: Path, smoke: bool, workdir: Path | None = None, timeout_s: int = 1800) -> float:
    """Run ``path`` top to bottom in a fresh kernel; save it with outputs unless ``smoke``. Returns seconds.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        With the failing cell and its traceback.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("FLB_SMOKE")
    os.environ["FLB_SMOKE"] = "1" if smoke else "0"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = workdir or (Path(tmp) if smoke else path.parent)
            client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
            start = time.perf_counter()
            client.execute()
            elapsed = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("FLB_SMOKE", None)
        else:
            os.environ["FLB_SMOKE"] = env_before
    if not smoke:
        nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="notebook file names (default: all)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    paths = [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path, args.smoke):.1f} s", flush=True)


if __name__ == "__main__":
    main()
