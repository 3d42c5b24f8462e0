"""Sphinx configuration of the stagetools documentation (Markdown pages, read by MyST).

Build: ``sphinx-build -W --keep-going -n -b html docs build/docs`` (docs/run does it): a
warning, such as a broken link, a missing page or a page in no table of contents, fails the
build. The table of System attributes is made here from ``System.FIELDS`` at every build.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stagetools  # noqa: E402 (the checkout's, above this folder)

project = "stagetools"
author = "the stagetools authors"
copyright = "2026, the stagetools authors"
release = version = stagetools.__version__

extensions = ["myst_parser"]
myst_enable_extensions = ["deflist"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # links to the sections of another page: page.md#section
nitpicky = True
html_theme = "furo"
html_title = f"stagetools {release}"
html_static_path = []

# The page marker replaced by the table of System.FIELDS.
FIELDS_MARKER = "<!-- generated: System.FIELDS -->"


def _shown(value):
    """A value as the JSON output has it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def system_fields_table():
    """Every attribute of System, in order, with its value for shop_prod (the defaults: no
    declaration) and its meaning, as a Markdown table."""
    values = stagetools.get_expected_system_from_name("shop_prod", declared={}).as_dict()
    rows = ["| attribute | `shop_prod` | meaning |", "|---|---|---|"]
    for name, meaning in stagetools.System.FIELDS.items():
        value = _shown(values[name]) or "(empty)"
        rows.append(f"| `{name}` | `{value}` | {meaning.replace('|', '&#124;')} |")
    rows.append("")
    rows.append(f"This table is made from `System.FIELDS` when the documentation is built, on a "
                f"host of {os.cpu_count()} cores (which `workers` follows).")
    return "\n".join(rows)


def _fill_generated(app, docname, source):
    if FIELDS_MARKER in source[0]:
        source[0] = source[0].replace(FIELDS_MARKER, system_fields_table())


def setup(app):
    app.connect("source-read", _fill_generated)
