# Two commands for a new user: `make demo` and `make test`. Each sets up .venv first (seconds when up to date).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.gpfm-installed
# Debian packages the tests need (installed only when missing): Chromium opens the leaderboard page;
# a Java runtime runs pycocoevalcap's METEOR 1.5 jar.
APT_PKGS := chromium $(if $(shell command -v java),,default-jre-headless)

.PHONY: venv sysdeps demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	  || echo "warning: could not install$$missing; tests that need them will be skipped"; \
	fi

demo: venv
	$(BIN)/gpfm demo --out demo_out

test: venv sysdeps
	$(BIN)/python -m pytest

bench: venv
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: venv
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) demo_out
