"""``python -m nixeryd``: the same as the ``nixeryd`` command."""

from nixeryd.cli import main

main()
