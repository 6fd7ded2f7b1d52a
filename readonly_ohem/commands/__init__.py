"""One module per ``readonly-ohem`` sub-command (``net``, ``run``, ``train``, ``test``, ``eval``,
``make_minivoc``, ``proposals``, ``inspect``, ``demo``), each holding the function ``cli`` calls.

Only ``cli`` and these modules import this package: what a command shares with the library lives
in the library (``train.setup_training``, ``inspect.live``, ...).
"""
