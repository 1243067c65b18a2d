"""The repository's folders that several modules use, in one place (no imports beyond the standard library):
the configs, the committed results, and the default folders of runs."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
