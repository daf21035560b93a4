"""`python -m orchestrator.sweep …` is `python orchestrator/run.py sweep …`."""

import sys

from orchestrator.sweep.tune import main

sys.exit(main())
