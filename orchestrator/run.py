"""The command line: dispatches to the command named first, else runs a campaign.

    python orchestrator/run.py [--config …] [--set …] [--resume RUN_DIR]   # a campaign
    python orchestrator/run.py annotate RUN_DIR        # label a waiting cycle in the browser
    python orchestrator/run.py export RUN_DIR          # predictions as RELION STAR / copick picks
    python orchestrator/run.py report RUN_DIR          # rebuild report.html
    python orchestrator/run.py sweep --config sweep_lambda
    python orchestrator/run.py ingest DIR --out pools/mine
    python orchestrator/run.py simulate --out pools/sim
    ray job submit --working-dir . -- python orchestrator/run.py --set train.num_workers=4

Each command is its module's `main` (COMMANDS); a campaign is `orchestrator/campaign/cli.py`.
This file stays at this path: deploy/, the docs and `ray job submit` name it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "annotate": "orchestrator.annotate.server",
    "export": "orchestrator.campaign.export",
    "report": "orchestrator.campaign.report",
    "sweep": "orchestrator.sweep.tune",
    "ingest": "orchestrator.data.ingest",
    "simulate": "orchestrator.data.simulate",
}
CAMPAIGN = "orchestrator.campaign.cli"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    module = importlib.import_module(COMMANDS[name] if name else CAMPAIGN)
    return module.main(argv[1:] if name else argv)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the project importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
