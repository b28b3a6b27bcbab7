# oneword: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/ti invert examples/red-disc --model tiny-sd1 --token "<red-disc>" --init disc \
		--steps 60 --batch_size 2 --resolution 32 --save_every 30 --preview_every 30 \
		--preview_steps 10 --out runs/demo
	$(BIN)/ti generate --model tiny-sd1 --embedding runs/demo/learned_embeds.safetensors \
		--prompt "a photo of <red-disc>" "a painting of <red-disc> on the beach" -n 4 --steps 10 \
		--out runs/demo/generated.png
	@echo "demo done: see runs/demo/ (loss.png, previews/, generated.png)"

bench: $(STAMP)
	$(BIN)/python bench/step_speed.py --steps 20
	$(BIN)/python bench/amortization.py --quick

clean:
	rm -rf runs/demo .pytest_cache
