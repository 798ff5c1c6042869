"""``python -m benchmarks [NAME ...] [--quick] [--update]``: the whole benchmark suite (see :mod:`benchmarks.suite`)."""

import sys

from benchmarks.suite import main

sys.exit(main())
