# oneword: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-fast lint format bench serve venv chromium postgresql clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) chromium postgresql
	$(BIN)/python -m pytest -q --durations=15

# The web page's test drives Debian's chromium through Playwright (its own browser download cannot
# work on machines that reach only the package registries).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# The job store's tests start a real PostgreSQL server (initdb / pg_ctl in a temporary folder).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql; }

test-fast: $(STAMP)  # skips the end-to-end and shipped-weight tests (marker `slow`)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check oneword tests bench
	$(BIN)/ruff format --check oneword tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix oneword tests bench
	$(BIN)/ruff format oneword tests bench

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/ti encode examples/toy/red-circle-stripes-silver --refine 100 --out runs/demo --no-progress
	$(BIN)/ti generate --model toy --embedding runs/demo/red-circle-stripes-silver/learned_embeds.safetensors \
		--prompt "a photo of <red-circle-stripes-silver>" "a photo of <red-circle-stripes-silver> on a teal background" \
		-n 4 --steps 25 --guidance 5 --out runs/demo/generated.png
	@echo "demo done: see runs/demo/red-circle-stripes-silver/ (report.md, preview.png, loss.csv, loss.png) and runs/demo/generated.png"

serve: $(STAMP)  # the toy world's service on http://127.0.0.1:8000 (API docs at /docs); see docs/serve.md
	$(BIN)/ti serve --data runs/serve

bench: $(STAMP)
	$(BIN)/python bench/step_speed.py --steps 20
	rm -rf runs/bench/quick  # measure afresh: the bench resumes from its progress file
	$(BIN)/python bench/amortization.py --quick --out runs/bench/quick

clean:
	rm -rf runs/demo .pytest_cache
