"""`python -m cpia_hf.train ...` (and `accelerate launch -m cpia_hf.train ...`)."""
import sys

from .cli import main

sys.exit(main())
