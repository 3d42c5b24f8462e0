"""The README's examples are the documentation's: each command block of README.md is also on a
page of docs/, where examples.py runs the console blocks, so the README cannot go stale alone."""

import pathlib
import re

DOCS = pathlib.Path(__file__).parent
BLOCK = re.compile(r"^```(console|shell)\n(.*?)^```", re.M | re.S)


def blocks(text):
    """(language, body) of each console and shell block."""
    return [(language, body) for language, body in BLOCK.findall(text)]


def test_readme_command_blocks_are_on_the_pages():
    readme = blocks((DOCS.parent / "README.md").read_text())
    pages = [block for page in sorted(DOCS.rglob("*.md")) for block in blocks(page.read_text())]
    assert readme, "the README has no command block: the pattern is out of date"
    # A console block must be a console block of a page (run there), line for line; a shell
    # block (commands without output) must be in one, so that it is written in one place.
    page_text = "\n".join(body for _, body in pages)
    for language, body in readme:
        if language == "console":
            assert (language, body) in pages, f"README console block not on a page:\n{body}"
        else:
            for line in body.splitlines():
                assert line.split("  #")[0].strip() in page_text, (
                    f"README shell line on no page of docs/: {line}")
