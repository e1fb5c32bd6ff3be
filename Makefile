# The two commands the README starts with. Both install whatever is missing first (as root).
PREFIX ?= /opt/gfvm
PYTEST_ARGS ?=

.PHONY: install demo test test-long bench

install:
	deploy/install --prefix $(PREFIX)

demo:
	deploy/install --prefix $(PREFIX)
	$(PREFIX)/venv/bin/gfvm demo

# The test command CI runs (.ci/run). Root, FUSE, userfaultfd, namespaces and CRIU tests run for
# real; under CI=true a missing feature fails instead of skipping.
test:
	deploy/install --dev --prefix $(PREFIX)
	$(PREFIX)/venv/bin/gfvm doctor
	cd $(CURDIR) && $(PREFIX)/venv/bin/python -m pytest -q -m "not long" $(PYTEST_ARGS)

# Soak, fuzz and long fault runs: not part of `make test`.
test-long:
	deploy/install --dev --prefix $(PREFIX)
	cd $(CURDIR) && $(PREFIX)/venv/bin/python -m pytest -q -m long $(PYTEST_ARGS)

bench:
	deploy/install --prefix $(PREFIX)
	$(PREFIX)/venv/bin/gfvm bench all
