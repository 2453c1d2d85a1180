"""python -m gpt4.kernels: build our kernels now, not at the first model load (scripts/install.sh runs it)."""

import sys

from . import load_w4a8, w4a8_unavailable_reason
from ..errors import GPT4Error

reason = w4a8_unavailable_reason()
if reason:
    print(f"w4a8 kernel: not built here: {reason}")
else:
    try:
        load_w4a8()
        print("w4a8 kernel: ready")
    except GPT4Error as e:  # the install goes on: --quant auto then takes int4
        print(f"w4a8 kernel: {e}", file=sys.stderr)
