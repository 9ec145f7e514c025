"""Test worker for signal forwarding: waits for a stop request, records it, exits 0 (a resumable stop)."""

import os
import sys
import time
from pathlib import Path

from alignkit.engine.faults import StopRequest

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = os.environ.get("RANK", "?")
    with StopRequest() as stop:
        (out / f"ready-{rank}").write_text("")
        deadline = time.time() + 120
        while not stop.requested and time.time() < deadline:
            time.sleep(0.05)
    (out / f"stopped-{rank}").write_text(str(stop.signal_name))
    sys.exit(0 if stop.requested else 1)
