"""Browser tests import their helpers from ``browser_util`` beside this file."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
