"""`python -m r1ray train ...`: the `r1ray` command, e.g. as a `ray job submit` entrypoint."""

import sys

from r1ray.cli import main

sys.exit(main())
