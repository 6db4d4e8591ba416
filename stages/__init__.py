"""Stages of the SSD reproducibility pipeline; each runs as ``python -m stages.<name>``.

The only thing done at import time is refusing an interpreter the pinned stack cannot run on,
before any heavy import fails with a less helpful error. What the code needs is Python 3.10 or
3.11, any patch release: mxnet 1.9.1 needs numpy 1.23.5 (no wheels for 3.12+), and nothing
depends on a patch release (archives are extracted by stages/extract.py, which does not use
tarfile's extraction filters that only 3.10.12+/3.11.4+ have; tests/stages/test_extract.py
runs it without them).
"""
import sys

SUPPORTED_PYTHONS = ((3, 10), (3, 11))

if sys.version_info[:2] not in SUPPORTED_PYTHONS:
    sys.exit(
        f"This pipeline needs Python 3.10 or 3.11 (found {sys.version.split()[0]}): "
        "mxnet 1.9.1 needs numpy 1.23.5, which has no wheels for Python 3.12 or newer. "
        "Create the virtualenv with python3.11 (see README)."
    )
