# The README's two commands are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo test test-slow lint typecheck proto proto-check bench

PY := .venv/bin/python

setup:
	@scripts/setup.sh

demo: setup
	$(PY) -m demo

test: setup lint typecheck proto-check
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy sitepair agent broker demo

proto: setup
	$(PY) scripts/gen_protos.py

proto-check: setup
	$(PY) scripts/gen_protos.py --check

# Each benchmark waits for a quiet machine (1-minute load < 1) and prints its tables; the
# results are recorded in docs/benchmarks.md. `--quick` variants are smoke tests.
bench: setup
	$(PY) bench/vdisk.py
	$(PY) bench/control_plane.py
	$(PY) bench/replication.py
	$(PY) bench/dashboard.py
