"""``python -m minillm_rl.cli`` and the script the ``deepspeed`` launcher runs once per learner rank."""

import sys

from minillm_rl.cli import main

sys.exit(main())
