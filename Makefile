# The two commands of the README. Both set up .venv first (scripts/setup_venv.sh; re-runnable).
PY := .venv/bin/python

.PHONY: setup bench test gpu-check clean

setup:
	@bash scripts/setup_venv.sh

# The main job: the benchmark harness in quick mode (results under bench/results/).
bench: setup
	$(PY) -m bench --quick

# The test suite (CPU: Triton under its interpreter, the C++ extension built with ninja).
test: setup
	$(PY) -m pytest -q

clean:
	rm -rf .venv build *.egg-info .pytest_cache fasttrain/_C*.so
