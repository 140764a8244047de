# Convenience targets; each one calls a script under scripts/ (which work without make).
.PHONY: run test demo bench lint

run:
	scripts/run.sh --config config.ini

test:
	scripts/test.sh

demo:
	scripts/demo.sh 30 demo

bench:
	scripts/venv.sh requirements.txt && .venv/bin/python bench/run.py

lint:
	scripts/venv.sh requirements-dev.txt && .venv/bin/ruff check .

.PHONY: install uninstall check-units
install:
	scripts/install.sh

uninstall:
	scripts/uninstall.sh

check-units:
	scripts/check-units.sh
