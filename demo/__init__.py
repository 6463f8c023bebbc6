"""The demo behind `make demo`: a broker and two sites on this machine."""
