"""Make ``mmgrow_example`` importable from a source checkout, installed or not, and whichever
folder pytest is started from (the repository root or this package's folder)."""

import sys
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
if PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)
