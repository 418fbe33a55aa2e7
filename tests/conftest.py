"""Fixtures shared by the whole suite."""

import sys
from pathlib import Path

# tests/support is imported as `support` by every test module.
sys.path.insert(0, str(Path(__file__).parent))
