# snapengine: `make run` starts the daemon on the embedded origin, `make test` runs every test.
# Both go through `make setup`, which installs what is missing (Debian packages, .venv).

PYTHON   := /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
RUN_DIR  ?= /run/elastio-snap
APT_PKGS := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-venv \
            python3-xxhash python3-prometheus-client python3-sdnotify \
            python3-argparse-manpage python3-shtab fuse3 fio e2fsprogs util-linux \
            man-db groff-base bash-completion systemd qemu-utils
BENCH_PKGS := qemu-system-common qemu-utils fio

.PHONY: setup run test bench soak clean apt man install

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
	$(VPY) -m pip install -q -e '.[test,docs]'
	touch $@

run: setup
	$(VENV)/bin/snapengine serve --run-dir $(RUN_DIR) --verbose

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

# bench.run runs once per BENCH_DIRS entry (default /dev/shm, tmpfs, and /var/tmp, this
# VM's ext4 disk); BENCH_ARGS is appended: make bench BENCH_DIRS=/dev/shm BENCH_ARGS=--quick
bench: setup
	@missing=$$(for p in $(BENCH_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(VPY) -m bench.run $(addprefix --dir ,$(or $(BENCH_DIRS),/dev/shm /var/tmp)) $(BENCH_ARGS)
	$(VPY) -m bench.durable
	$(VPY) -m bench.update_img
	$(VPY) -m bench.nbd_target
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

# Man pages and bash completion, generated from the argparse parsers (docgen/), so they
# say what --help says. Built with the defaults, not this shell's ELIO_RUN_DIR.
BUILD := build
GEN   := env -u ELIO_RUN_DIR -u SNAPENGINE_STATE_DIR $(VPY) -m
man: setup
	$(GEN) docgen.manpages $(BUILD)/man
	$(GEN) docgen.completion $(BUILD)/completion

# make install [DESTDIR=/tmp/pkg] [PREFIX=/usr/local] [SYSCONFDIR=/etc]: the tools run by
# /usr/bin/python3 from PREFIX/lib/snapengine (Debian's python3-* packages, which `make
# setup` installs, give them their libraries); nothing refers back to this checkout and
# nothing is written outside DESTDIR (the man pages and completion are generated straight
# into it). The config is installed only where none exists.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
LIBDIR     := $(PREFIX)/lib/snapengine
TOOLS      := snapengine:snapengine.serve elioctl:snapengine.cli update-img:snapengine.updateimg
MAN8 := $(DESTDIR)$(PREFIX)/share/man/man8
COMPLETIONS := $(DESTDIR)$(PREFIX)/share/bash-completion/completions
install: setup
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(LIBDIR)/snapengine \
	    $(DESTDIR)$(PREFIX)/lib/systemd/system $(MAN8) $(COMPLETIONS) \
	    $(DESTDIR)$(PREFIX)/share/doc/snapengine $(DESTDIR)$(SYSCONFDIR)/snapengine
	install -m 644 snapengine/*.py $(DESTDIR)$(LIBDIR)/snapengine/
	install -m 644 nbd_plugin.py $(DESTDIR)$(LIBDIR)/
	for t in $(TOOLS); do name=$${t%%:*}; module=$${t#*:}; \
	    printf '#!/usr/bin/python3\n"""%s, installed by make install."""\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import main\nsys.exit(main())\n' \
	        "$$name" "$(LIBDIR)" "$$module" > $(DESTDIR)$(PREFIX)/bin/$$name; \
	    chmod 755 $(DESTDIR)$(PREFIX)/bin/$$name; done
	for u in systemd/*.service.in; do \
	    sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' $$u \
	        > $(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$u .in); done
	chmod 644 $(DESTDIR)$(PREFIX)/lib/systemd/system/*.service
	$(GEN) docgen.manpages $(MAN8)
	$(GEN) docgen.completion $(COMPLETIONS)
	install -m 644 systemd/snapengine.toml $(DESTDIR)$(PREFIX)/share/doc/snapengine/snapengine.toml.example
	test -e $(DESTDIR)$(SYSCONFDIR)/snapengine/snapengine.toml || \
	    install -m 644 systemd/snapengine.toml $(DESTDIR)$(SYSCONFDIR)/snapengine/snapengine.toml

clean:
	rm -rf $(VENV) $(BUILD) *.egg-info .pytest_cache .hypothesis
