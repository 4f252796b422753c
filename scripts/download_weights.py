"""Download an official DeepSeek-VL2 checkpoint (thin CLI over deepseek_vl2.weights).

    .venv/bin/python scripts/download_weights.py --variant tiny --dest weights
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_vl2.weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
