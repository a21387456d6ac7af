"""`python -m analysis <command>`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
