"""pytest: make the flat top-level modules importable from tests/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
