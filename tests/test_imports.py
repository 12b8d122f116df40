"""`import jaxpeft` (and the library modules the GPU machine runs) must not pull in heavy optional packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "datasets", "gguf", "bitsandbytes", "matplotlib", "peft")
MODULES = ("jaxpeft", "jaxpeft.methods", "jaxpeft.convert.peft_io", "jaxpeft.train.run", "jaxpeft.train.loop",
           "jaxpeft.data", "jaxpeft.models.generate", "jaxpeft.convert.load")


def test_library_imports_stay_light():
    code = (f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
            f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "", f"imported at module load: {out.stdout.strip()}"
