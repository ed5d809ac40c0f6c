# The two commands that do all set-up on a fresh machine:
#   make run    convert the real SmolLM2-135M on the embedded default (no servers) and report
#   make test   run the test suite
.PHONY: setup run test bench-zero-shot

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/mha2mla convert smollm2-135m

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench-zero-shot: setup
	.venv/bin/python bench/zero_shot.py
