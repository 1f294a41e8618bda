"""`python -m modeling_dsg ...` is the `dsg` command (what `torchrun ... -m modeling_dsg build ...` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
