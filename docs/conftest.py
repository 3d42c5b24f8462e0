"""pytest docs/: every page's examples are tests (see examples.py)."""

import doctest
import os
import sys

from sybil import Sybil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import (  # noqa: E402
    ConsoleParser, DocTestParser, HostSetupParser, RequiresParser, teardown)

pytest_collect_file = Sybil(
    parsers=[RequiresParser(), HostSetupParser(), ConsoleParser(),
             DocTestParser(doctest_optionflags=doctest.ELLIPSIS)],
    patterns=["*.md"],
    teardown=teardown,
).pytest()
