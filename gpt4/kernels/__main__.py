"""python -m gpt4.kernels: build our kernels now, not at the first model load (scripts/install.sh runs it)."""

from . import w4a8_ready, w4a8_unavailable_reason

if w4a8_ready():  # a failed build is said in w4a8_ready's warning; the install goes on, --quant auto takes int4
    print("w4a8 kernel: ready")
else:
    print(f"w4a8 kernel: not built here: {w4a8_unavailable_reason() or 'the build failed (see the warning)'}")
