# `make demo` and `make test` set everything up on a fresh machine (Python 3.10+, pip, venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

# Where the project is not installed (a GPU machine with torch and triton), python3 runs it.
RUN_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: install test demo serve bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	@ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopus (apt-get install libopus0)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopus0 >/dev/null; \
	  else echo "libopus is missing: install it first (Debian/Ubuntu: sudo apt-get install libopus0)"; exit 1; fi; }
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "installing chromium for the web page's test (apt-get install chromium)"; \
	  { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the web page's test will skip"; }
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "installing haproxy for the scale-out test (apt-get install haproxy)"; \
	  { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; } || \
	  echo "haproxy could not be installed: the scale-out test will skip"; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m frontends.demo

# the tiny demo model on the CPU with the built-in page (its output is noise): no HF_TOKEN or GPU needed
serve: install
	$(VENV)/bin/ppx-serve --demo $(SERVE_ARGS)

bench:
	$(RUN_PY) -m benchmarks.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) artifacts build *.egg-info
