# snapengine: `make run` starts the daemon on the embedded origin, `make test` runs every test.
# Both go through `make setup`, which installs what is missing (Debian packages, .venv).

PYTHON   := /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
RUN_DIR  ?= /run/elastio-snap
APT_PKGS := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-venv \
            python3-xxhash fuse3 fio e2fsprogs util-linux
BENCH_PKGS := qemu-system-common qemu-utils fio

.PHONY: setup run test bench soak clean apt

setup: apt $(STAMP)

apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/snapengine serve --run-dir $(RUN_DIR) --verbose

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: setup
	@missing=$$(for p in $(BENCH_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(VPY) -m bench.run $(BENCH_ARGS)
	$(VPY) -m bench.durable
	$(VPY) -m bench.update_img
	$(VPY) -m bench.o1_timing
	$(VPY) -m bench.rss
	$(VPY) -m bench.fstrim
	$(VPY) -m bench.extents
	$(VPY) -m bench.group_pause
	$(VPY) -m bench.watch_stall

# Long runs, not in CI: kill -9 rounds, the engine model with many more examples, and
# the concurrency soak (tests/soak.py; tests/test_soak.py is its short CI version).
SOAK_ROUNDS ?= 100
SOAK_EXAMPLES ?= 5000
SOAK_MINUTES ?= 10
soak: setup
	SNAPENGINE_KILL_ROUNDS=$(SOAK_ROUNDS) $(VPY) -m pytest -q tests/test_kill9.py
	SNAPENGINE_MODEL_EXAMPLES=$(SOAK_EXAMPLES) $(VPY) -m pytest -q tests/test_model_engine.py \
	    -k test_engine_model
	$(VPY) -m tests.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
