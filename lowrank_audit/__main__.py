"""``python -m lowrank_audit``: start the command-line app."""

from lowrank_audit.cli import main

main()
