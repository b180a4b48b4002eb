"""The ``taskq`` command.

Importing this package is the first thing ``taskq`` does: for ``taskq serve`` and
``taskq dev`` it prepares the process before the slow imports (see ``app.startup``).
"""

import sys

from app.startup import prepare_service_process

prepare_service_process(sys.argv)
