"""One rank of a job :mod:`enigma_zero.launch` started: ``python -m enigma_zero.rank SCRATCH_FOLDER``.

The folder holds the run's ``config.json``; the main rank appends its progress to
``progress.jsonl`` there, and a rank that fails on an error enigma explains
writes the explanation to ``errors/rank-<N>.txt`` for the launcher to report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from enigma.errors import EnigmaError


@record
def main() -> int:
    from enigma_zero.launch import ERRORS_DIR, ProgressWriter
    from enigma_zero.trainer import config_from_dict, run_rank

    scratch = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    config = config_from_dict(json.loads((scratch / "config.json").read_text(encoding="utf-8")))
    try:
        run_rank(config, ProgressWriter(scratch / "progress.jsonl") if rank == 0 else None)
    except EnigmaError as exc:
        (scratch / ERRORS_DIR / f"rank-{rank}.txt").write_text(str(exc), encoding="utf-8")
        print(f"Error (rank {rank}): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
