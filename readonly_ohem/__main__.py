"""``python -m readonly_ohem`` is the ``readonly-ohem`` command."""
from readonly_ohem.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
