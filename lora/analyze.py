"""Deprecated: `python -m lora.analyze` became `python -m analysis` (same commands and options); this alias goes
in the next release. It only forwards: lora/ itself imports nothing of the analyses."""

import runpy
import sys

if __name__ == "__main__":
    print("note: `python -m lora.analyze` is deprecated and goes in the next release; "
          "use `python -m analysis` (same commands and options)", file=sys.stderr)
    runpy.run_module("analysis", run_name="__main__", alter_sys=True)
