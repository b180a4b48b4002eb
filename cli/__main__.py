"""``python -m cli`` runs the ``taskq`` command."""

from cli.main import main

main()
