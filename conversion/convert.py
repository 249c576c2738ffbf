"""Rebuild CPIA from its source datasets: the `cpia convert` command as a script.

    python conversion/convert.py --source-root /data/cpia-sources --out /data/cpia --workers 16
"""
import sys

from cpia_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
