"""Stands in for pip's get-pip.py, which ansible-test downloads from its own server (not a
package registry, so not reachable from CI): pip from the wheel that Python's ensurepip
carries, then what ansible-test asks for (pip==X, setuptools, wheel), from the index.

ensurepip runs in a process of its own: it turns off pip's configuration in its process."""
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip"])
wanted = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *wanted]))
