import os
import sys
from pathlib import Path

# One intra-op thread: the tests' models are tiny, where thread start-up costs more than it
# saves, and two processes each spinning two OpenMP threads on a 2-core machine can slow each
# other down a hundredfold. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))
