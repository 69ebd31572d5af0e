"""`python -m gemma4rt ...` = `python -m gemma4rt.server ...`."""
import sys

from gemma4rt.server import main

sys.exit(main())
