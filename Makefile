# Two commands on a fresh Debian 12 machine: `make demo` and `make test`.
# Each installs what it needs: Debian packages (when root), a venv, pinned Python packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-e2e bench soak lint debs debs-bench clean sweep wheel

debs:
	@sh scripts/install-debs

# The benchmarks' peers (wireguard-go, nebula, dnsperf): `make test` runs every benchmark
# once in smoke mode, so it needs them too.
debs-bench:
	@sh scripts/install-debs bench

$(STAMP): requirements.lock pyproject.toml | debs
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: debs $(STAMP)
	$(BIN)/fabricd demo

lint: $(STAMP)
	$(BIN)/ruff check .

# The unit, shell and replay suites run as an ordinary user (scripts/unprivileged);
# the end-to-end suite needs root for its network namespaces.
test: debs debs-bench $(STAMP) lint
	$(BIN)/python activators/build.py --check
	sh scripts/unprivileged $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/shell tests/replay
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

test-unit: $(STAMP)
	sh scripts/unprivileged $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/shell tests/replay

test-e2e: debs debs-bench $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

bench: debs debs-bench $(STAMP)
	$(BIN)/python -m tests.bench

# Ten minutes of mixed traffic on two workers with both daemons' memory and fds sampled
# (FABRICD_SOAK_SECONDS=120 make soak for a shorter one). Needs root.
FABRICD_SOAK_SECONDS ?= 600
soak: debs $(STAMP)
	FABRICD_SOAK_SECONDS=$(FABRICD_SOAK_SECONDS) $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/soak

# build/ goes first and after: setuptools never cleans it, so files deleted from the
# tree would still ship.
wheel: $(STAMP)
	rm -rf build dist *.egg-info
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w dist .
	rm -rf build *.egg-info

# Namespaces of crashed test, demo and benchmark runs, then any daemon's pod resolv.conf
# files (/etc/netns/<name>/) whose netns is gone: a daemon killed with SIGKILL leaves them.
sweep: $(STAMP)
	$(BIN)/python -m fabric.tools.sandbox --sweep
	$(BIN)/python -m gateway.resolvconf --sweep

clean:
	rm -rf $(VENV) *.egg-info build dist
