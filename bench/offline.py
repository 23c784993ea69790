"""What every bench does before importing anything heavy: run offline (no model hub, no dataset downloads, no
tokenizer thread pools fighting the model for the cores) and import the checkout's probllm, not an installed one.

    from offline import ROOT  # bench/ is the script's folder, so it is on sys.path
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
