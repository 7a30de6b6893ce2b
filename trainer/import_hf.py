"""`python -m trainer.import_hf HF_DIR OUT --config CFG`: the command; the code is `trainer.hf.import_hf`."""
import sys

from trainer.hf.import_hf import main

if __name__ == "__main__":
    sys.exit(main())
