"""`python -m trainer.plan CONFIG ...`: see `trainer.plan.cli`."""
import sys

from trainer.plan.cli import main

sys.exit(main())
