"""`python -m trainer.export CKPT OUT [--no-mtp]`: the command; the code is `trainer.hf.export`."""
import sys

from trainer.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
