"""One module per ``readonly-ohem`` sub-command; ``cli`` parses arguments and calls one of them."""
