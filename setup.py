# The package is declared in pyproject.toml; this file stays for the layout of the design card
# and for tools that still look for it.
from setuptools import setup

setup()
