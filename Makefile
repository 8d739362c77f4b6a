# flower-large-batch: `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
RUN_CONFIG ?=
FEDERATION_CONFIG ?=
OUT ?=

NODES ?= 3

.PHONY: install run test bench deploy-local clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	cd /tmp && $(abspath $(BIN))/python -c "import flb, torch, torchvision, flwr, flwr_datasets, ray, sklearn, pandas, matplotlib, nbclient, ipykernel, pytest"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments.run --run-config "$(RUN_CONFIG)" --federation-config "$(FEDERATION_CONFIG)" --out "$(OUT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_sim

deploy-local: $(STAMP)
	$(BIN)/python -m experiments.deploy_local --nodes $(NODES) --check-intruder --run-config "num-server-rounds=3 $(RUN_CONFIG)"

clean:
	rm -rf results .flwr
