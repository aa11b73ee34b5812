import os
import signal
import sys
from pathlib import Path

# One intra-op thread: the tests' models are tiny, where thread start-up costs more than it
# saves, and two processes each spinning two OpenMP threads on a 2-core machine can slow each
# other down a hundredfold. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The commands' output is read as a pipe gives it, unwrapped: pytest-xdist's workers set
# COLUMNS=80, which folds it at 80 columns as a terminal would (tests that want a width set one).
os.environ.pop("COLUMNS", None)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))

# Run as a background job of a script (a CI runner may), pytest starts with SIGINT ignored, and
# the commands it starts would inherit that and leave it ignored, as a background job should:
# the tests that send them a Ctrl-C need it handled. A Python handler here is reset to the
# default in every program started from it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
